"""Operating it: Ray's Prometheus export carries Textbot's own metrics, and each
request leaves one structured log line (not one per token, no prompt text)."""

import glob
import json
import os
import time


from tests.helpers.metrics import textbot_samples

HELLO = [{"role": "user", "content": "A secret prompt 7f3a"}]


def test_prometheus_export_has_textbots_metrics_with_sane_values(http, metrics_url):
    body = {"messages": HELLO, "max_tokens": 24, "temperature": 0, "stream": True}
    for _ in range(2):  # the second reads its prompt from the prefix cache
        with http.stream("POST", "/tiny-chat/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            list(response.iter_lines())

    deadline, samples = time.monotonic() + 90, {}
    while time.monotonic() < deadline:  # Ray exports every few seconds
        samples = textbot_samples(metrics_url, "tiny-chat")
        # The gauges are reported again at each health check (every 10 s).
        if (samples.get("ray_textbot_completion_tokens_total", 0) >= 48 and "ray_textbot_requests_running" in samples
                and samples.get("ray_textbot_prefix_cache_hit_tokens_total", 0) > 0
                and samples.get("ray_textbot_kv_used_bytes[prefix_cache]", 0) > 0
                and samples.get("ray_textbot_kv_used_bytes[rows]", 1) == 0):
            break
        time.sleep(2)
    print({k: v for k, v in sorted(samples.items())})
    assert samples.get("ray_textbot_completion_tokens_total", 0) >= 24
    assert samples.get("ray_textbot_prompt_tokens_total", 0) >= 1
    assert samples.get("ray_textbot_requests_finished_total[length]", 0) >= 1
    for histogram in ("time_to_first_token", "request_duration", "inter_token_latency"):
        count = samples[f"ray_textbot_{histogram}_seconds_count"]
        mean = samples[f"ray_textbot_{histogram}_seconds_sum"] / count
        assert count >= 1 and 0 < mean < 60, (histogram, count, mean)
    # A 24-token reply has 23 gaps between its tokens: at least that many were observed.
    assert samples["ray_textbot_inter_token_latency_seconds_count"] >= 23
    assert "ray_textbot_requests_running" in samples and "ray_textbot_requests_waiting" in samples
    hits = samples["ray_textbot_prefix_cache_hit_tokens_total"]
    assert 0 < hits < samples["ray_textbot_prefix_cache_queried_tokens_total"] <= samples["ray_textbot_prompt_tokens_total"]
    assert samples["ray_textbot_prefix_cache_bytes"] > 0
    # Memory: the engine process's, and the KV budget with what holds it. Both replies ended, so
    # their rows are let go and their keys and values are in the prefix cache, within the budget.
    assert 50 * 2**20 < samples["ray_textbot_engine_rss_bytes"] < 8 * 2**30
    budget = samples["ray_textbot_kv_budget_bytes"]
    assert samples["ray_textbot_kv_used_bytes[rows]"] == 0
    assert 0 < samples["ray_textbot_kv_used_bytes[prefix_cache]"] <= budget
    assert samples["ray_textbot_kv_used_bytes[prefix_cache]"] == samples["ray_textbot_prefix_cache_bytes"]
    assert 0 < samples["ray_textbot_kv_peak_bytes"] <= budget


def test_each_request_leaves_one_structured_log_line_without_the_prompt(http, serve_logs):
    response = http.post("/tiny-chat/v1/chat/completions", json={"messages": HELLO, "max_tokens": 24,
                                                                 "temperature": 0})
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    logs = serve_logs

    deadline, lines = time.monotonic() + 30, []
    while time.monotonic() < deadline and not lines:
        lines = [line for path in glob.glob(os.path.join(logs, "replica_tiny-chat_Textbot_*.log"))
                 for line in open(path, encoding="utf-8", errors="replace")
                 if request_id in line and '"event": "reply"' in line]
        time.sleep(0.5)
    assert len(lines) == 1, lines
    record = json.loads(lines[0][lines[0].index("{"):])
    assert record["route"] == "POST /v1/chat/completions"
    assert record["completion_tokens"] == 24 and record["prompt_tokens"] > 0
    assert 0 <= record["cached_tokens"] < record["prompt_tokens"]
    assert record["finish_reason"] == "length" and record["error"] is None
    assert 0 < record["time_to_first_token_ms"] <= record["duration_ms"]
    assert "7f3a" not in lines[0]  # no prompt text in the log
