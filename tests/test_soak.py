"""The soak tool (python -m bench.soak) runs end to end, briefly, against the test session's
stack: every kind of traffic, the engine process found, memory read, no unexpected error.
Its figures are not checked here."""

import json

from bench import processes
from bench.soak import main


def test_a_short_soak_sends_every_kind_of_traffic_and_reads_the_engines_memory(base_url, metrics_url, tmp_path):
    run = main(["--url", base_url, "--api-path", "/tiny-chat", "--app", "tiny-chat", "--no-start",
                "--duration", "30", "--clients", "3", "--sample-every", "10", "--seed", "7",
                "--metrics-url", metrics_url, "--kv-budget-mb", "64", "--out", str(tmp_path / "soak")])

    assert run["unexpected_errors"]["count"] == 0, run["unexpected_errors"]["examples"]
    assert set(run["requests"]) == {"stream", "conversation", "abandoned", "bad", "tutorial"}, run["requests"]
    assert run["requests"]["bad"].get("refused", 0) > 0 and run["requests"]["stream"].get("ok", 0) > 0
    assert run["ttft"]["first"]["p50_ms"] and run["ttft"]["last"]["p50_ms"]

    # Readings at the start, every 10 s, and at the end, each with the measured application's engine.
    samples = run["memory_samples"]
    assert samples[0]["label"] == "start" and samples[-1]["label"] == "end" and len(samples) >= 4
    for sample in samples:
        roles = {p["role"] for p in sample["processes"].values()}
        assert {"engine (tiny-chat)", "Textbot replica (tiny-chat)", "ingress (tiny-chat)", "Serve proxy",
                "raylet", "GCS"} <= roles, roles
        assert sample["total_rss_mb"] > 0
    [engine] = run["check"]["engines"]
    assert engine["start_rss_mb"] > 0 and engine["end_rss_mb"] > 0 and engine["limit_mb"] > engine["start_rss_mb"]
    assert run["check"]["kv_budget_source"] == "--kv-budget-mb"

    saved = json.loads((tmp_path / "soak.json").read_text())
    assert saved["total_requests"] == run["total_requests"]
    markdown = (tmp_path / "soak.md").read_text()
    assert "## Textbot" in markdown and "engine (tiny-chat)" in markdown


def test_the_stack_is_found_from_the_port_it_serves_on(base_url):
    """Serve's proxy listens on the session's port; above it, the raylet's parent (here the test
    session's driver, which started Ray) and the Ray session's processes."""
    port = int(base_url.rsplit(":", 1)[1])
    table = processes.process_table()
    listener = processes.listening_pid(port)
    assert processes.role(table[listener], table) == "Serve proxy"
    scope = processes.scope_from_listener(listener, table)
    members = scope.members(table)
    assert listener in members and scope.session
    assert {"raylet", "GCS", "Serve controller"} <= {processes.role(table[p], table) for p in members}
