"""The soak tool (python -m bench.soak) runs end to end, briefly, against the test session's
stack: every kind of traffic, the engine process found, memory read, no unexpected error.
Its figures are not checked here."""

import json

from bench import processes
from bench.soak import Result, main, memory_check, openai_error_shape, ttft_drift


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
        assert {"engine (tiny-chat)", "Textbot replica tiny-chat (tiny-chat)", "ingress (tiny-chat)", "Serve proxy",
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


# Fast checks of the soak's parts, without a stack.

def _table(*rows: tuple[int, int, str]) -> dict:
    return {pid: processes.Process(pid, ppid, cmd) for pid, ppid, cmd in rows}


MAKE_RUN = _table(
    (10, 1, "make run"), (11, 10, "/v/bin/python -m backend.launch --http-port=8000 deploy.yaml"),
    (12, 11, "/v/bin/python /v/bin/ray start --head --block --port=6379"),
    (13, 12, "/v/ray/core/src/ray/gcs/gcs_server --session-name=session_2026-12-06_07-25-01_123456_12"),
    (14, 12, "/v/ray/core/src/ray/raylet/raylet --session_dir=/tmp/ray/session_2026-12-06_07-25-01_123456_12 "
             "--dashboard_agent_command=/v/bin/python -u /v/ray/dashboard/agent.py"),
    (15, 14, "ray::ProxyActor"),
    (16, 14, "ray::ServeReplica:textbot:Textbot:SmolLM2-135M-Instruct.initialize_and_get_metadata"),
    (17, 14, "ray::ServeReplica:textbot:TextbotAPI"), (18, 11, "/v/bin/python -m backend.engine.process --warm /s 11 {}"),
    (19, 16, "/v/bin/python -m backend.engine.process 62"), (20, 1, "someone else's python -m pytest"),
)


def test_each_process_of_a_make_run_stack_is_named_by_its_program():
    roles = {pid: processes.role(MAKE_RUN[pid], MAKE_RUN) for pid in range(11, 20)}
    assert roles == {11: "launcher", 12: "ray start", 13: "GCS", 14: "raylet", 15: "Serve proxy",
                     16: "Textbot replica SmolLM2-135M-Instruct (textbot)", 17: "ingress (textbot)",
                     18: "engine (textbot)", 19: "engine (textbot)"}


def test_a_models_replica_is_named_with_its_model_whatever_its_name_holds():
    titles = {"ray::ServeReplica:textbot:Textbot:gemma-3-270m": "Textbot replica gemma-3-270m (textbot)",
              "ray::ServeReplica:duo:Textbot:Qwen2.5-0.5B.handle_request_streaming": "Textbot replica Qwen2.5-0.5B (duo)",
              "ray::ServeReplica:duo:Textbot:Qwen2.5-0.5B": "Textbot replica Qwen2.5-0.5B (duo)",
              "ray::ServeReplica:duo:TextbotAPI.handle_request": "ingress (duo)",
              "ray::ServeReplica:chat:ChatPage": "chat page (chat)",
              # While a replica starts, its actor's name comes first.
              "ray::SERVE_REPLICA::textbot#Textbot:gemma-3-270m#jso2t1xe:ServeReplica:textbot:Textbot:gemma-3-270m"
              ".__init__": "Textbot replica gemma-3-270m (textbot)",
              "ray::SERVE_REPLICA::chat#ChatPage#bdr98czm:ServeReplica:chat:ChatPage.__init__": "chat page (chat)"}
    table = _table(*((pid, 1, title) for pid, title in enumerate(titles, 2)))
    assert [processes.role(table[pid], table) for pid in sorted(table)] == list(titles.values())
    # An engine started by a model's replica belongs to the replica's application.
    table[9] = processes.Process(9, 3, "/v/bin/python -m backend.engine.process 3")
    assert processes.role(table[9], table) == "engine (duo)"


def test_the_stack_above_a_listener_is_its_launchers_tree_and_nothing_else():
    scope = processes.scope_from_listener(15, MAKE_RUN)
    assert scope.roots == (11,) and scope.members(MAKE_RUN) == set(range(11, 20))
    without_launcher = {pid: p for pid, p in MAKE_RUN.items() if pid not in (10, 11, 18)}
    scope = processes.scope_from_listener(15, without_launcher)
    assert scope.roots == (12,) and scope.session == "session_2026-12-06_07-25-01_123456_12"
    assert 20 not in scope.members(without_launcher)


def test_the_listener_of_a_port_is_found():
    import os

    from tests.helpers.ports import listening

    with listening() as port:
        assert processes.listening_pid(port) == os.getpid()
    assert processes.memory_kb(os.getpid())["rss_kb"] > 0


def test_the_memory_check_allows_the_kv_budget_and_ten_percent():
    rows = [{"pid": 1, "role": "engine (textbot)", "start_rss_mb": 1000.0, "end_rss_mb": 1600.0},
            {"pid": 2, "role": "engine (textbot)", "start_rss_mb": None, "end_rss_mb": 900.0},
            {"pid": 3, "role": "ingress (textbot)", "start_rss_mb": 100.0, "end_rss_mb": 5000.0}]
    check = memory_check(rows, "textbot", 512, "--kv-budget-mb")
    assert [(e["pid"], e["limit_mb"], e["met"]) for e in check["engines"]] == [(1, 1663.2, True)]
    assert check["others"] == [2] and check["met"] is True
    assert memory_check(rows, "textbot", 400, "--kv-budget-mb")["met"] is False
    assert memory_check(rows, "textbot", None, "none")["met"] is None


def test_time_to_first_token_drift_compares_the_first_and_last_minute_of_traffic():
    results = [Result("stream", "ok", started, ttft_ms=100.0 if started < 60 else 200.0) for started in range(0, 600, 5)]
    results.append(Result("bad", "refused", 300.0))
    drift = ttft_drift(results)
    assert drift["window_s"] == 60 and drift["first"]["p50_ms"] == 100 and drift["last"]["p50_ms"] == 200
    assert drift["drift_p50"] == 2.0


def test_a_refusal_in_openais_error_shape():
    import httpx

    good = httpx.Response(400, json={"error": {"message": "Invalid 'temperature'.", "type": "invalid_request_error"}})
    assert openai_error_shape(good)
    assert not openai_error_shape(httpx.Response(400, json={"detail": "bad"}))
    assert not openai_error_shape(httpx.Response(400, text="bad"))
