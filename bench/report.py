"""The benchmark's outputs: results JSON, a PNG plot, and docs/BENCHMARKS.md
(generated tables and target checks; hand-written notes below a marker are kept)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

WAKE_TARGET_S = 10  # issue 30: a sleeping model's first token within 10 s of asking, caches warm
NOTES_MARKER = "<!-- Hand-written notes below this line are kept when the benchmark rewrites this file. -->"

TITLES = {
    "engine": "(a) engine in-process",
    "transformers": "(b) transformers generate per request (the tutorial's way)",
    "http": "(c) Textbot HTTP stream (POST /api/)",
    "openai": "(d) OpenAI chat completions (SSE)",
    "page": "(e) chat page (Gradio queue + SSE, one session per chat)",
    "llamacpp": "(f) llama.cpp's llama-server (continuous batching), same GGUF",
}

# The CPU features the kernels of torch and llama.cpp pick their code paths by, in this order.
CPU_FLAGS = ["sse4_2", "avx", "fma", "f16c", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
             "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
             "amx_fp16", "neon", "asimd", "sve"]


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and which of CPU_FLAGS it has (Linux's /proc/cpuinfo)."""
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return cpu or platform.processor(), [flag for flag in CPU_FLAGS if flag in flags]


def machine() -> dict:
    import torch
    import transformers

    cpu, flags = cpu_info()
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        memory_gb = None
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_flags": flags, "memory_gb": memory_gb,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def model_key(target: str, name: str) -> str:
    """A per-model result's name: `openai:gemma-3-270m`, `llamacpp-2t:gemma-3-270m`."""
    return f"{target}:{name}"


def title(target: str, run: dict) -> str:
    # `<run>:<model>`: one model of several, by name (model_key); a llama-server run's threads are
    # the same for every model.
    route, _, model = target.partition(":")
    threads = run["settings"].get("llamacpp_threads", {}).get(route)
    if threads is None:
        name = TITLES.get(route, route)
    else:
        like = ", as a Textbot model replica" if threads == run["settings"].get("textbot_threads") else ""
        name = f"{TITLES['llamacpp']}, {threads} thread{'s' if threads > 1 else ''}{like}"
    return f"{name}, model {model}" if model else name


def peer_lines(run: dict) -> list[str]:
    """The engine beside each llama.cpp run, at one stream and at 8."""
    engine = {lv["concurrency"]: lv for lv in run["results"].get("engine") or []}
    rows = []
    for target, threads in run["settings"].get("llamacpp_threads", {}).items():
        peer = {lv["concurrency"]: lv for lv in run["results"].get(target) or []}
        for streams in (1, 8):
            ours, theirs = engine.get(streams), peer.get(streams)
            if ours and theirs and ours["aggregate_tok_s"] and theirs["aggregate_tok_s"]:
                rows.append(f"| {streams} | {ours['aggregate_tok_s']} ({run['settings'].get('textbot_threads')}) "
                            f"| {theirs['aggregate_tok_s']} ({threads}) "
                            f"| {ours['aggregate_tok_s'] / theirs['aggregate_tok_s']:.2f}x |")
    if not rows:
        return []
    return ["## Beside llama.cpp", "",
            "Aggregate output tokens/s, the engine in-process against llama.cpp's llama-server "
            "(threads in brackets; the engine's are a Textbot model replica's torch threads). "
            "llama.cpp's include its HTTP server, the engine's none: Textbot's served rows are below.", "",
            "| streams | engine tok/s (threads) | llama.cpp tok/s (threads) | engine / llama.cpp |",
            "| ---: | ---: | ---: | ---: |", *rows, ""]


def wake_lines(run: dict) -> list[str]:
    """`wake`: each sleeping model's first token from no replica, beside its first token awake."""
    if not run.get("wake"):
        return []

    def cached(record: dict) -> str:
        found = record.get("caches") or {}
        say = {True: "on disk", False: "absent", None: "unknown"}
        return f"converted {say[found.get('converted')]}, compiled {say[found.get('compiled')]}"

    rows = [f"| {w['model']} | {w['ttft_ms']} | {w['awake_ttft_ms']} | {w.get('replica_start_ms')} | "
            f"{w['running_seen_ms']} | {w['tokens']} in {w['total_ms']} | {cached(w)} | {w.get('load_average')} | "
            f"{'; '.join(w['errors']) or 0} |" for w in run["wake"]]
    return ["## Waking a sleeping model", "",
            "Each model that sleeps (autoscaling min_replicas 0): the benchmark waits until it has no replica "
            "(`GET /v1/models` says `loaded: false`), then sends one request by its name through the OpenAI "
            "route and times it from sending; then one more, the model awake. The difference is the replica's "
            "start as a client waits for it (Ray and Serve run already). 'Running seen': when `/v1/models` "
            "first said `loaded: true`, polled every 0.5 s.", "",
            "| model | first token from zero, ms | first token awake, ms | difference, ms | running seen, ms "
            "| tokens in ms | caches before | load average | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |", *rows, ""]


def mixed_lines(run: dict) -> list[str]:
    """`mixed`: streams at once over two models, in turn: the whole and each model's share."""
    mixed = run.get("mixed")
    if not mixed:
        return []
    rows = [(name, level) for name, level in mixed["models"].items()] + [("both", mixed["all"])]
    return ["## Two models at once", "",
            f"{mixed['concurrency']} streams started together, one request each, the models in turn "
            f"({', '.join(mixed['models'])}), through the OpenAI route; each model awake before. A model's "
            "aggregate is its tokens over the run's whole time.", "",
            "| model | streams | TTFT p50 ms | TTFT p95 ms | ITL p95 ms | per-stream tok/s | aggregate tok/s | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *(f"| {name} | {lv['concurrency']} | {lv['ttft_p50_ms']} | {lv['ttft_p95_ms']} | {lv['itl_p95_ms']} | "
              f"{lv['per_stream_tok_s']} | {lv['aggregate_tok_s']} | {lv['errors']}/{lv['requests']} |"
              for name, lv in rows), ""]


def write_json(path: Path, run: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=2))


def write_side_study(out: Path, name: str, run: dict, markdown: str) -> None:
    """A side study's results (bench.conversations, bench.structured): name.json and name.md in `out`,
    the Markdown printed too."""
    write_json(out / f"{name}.json", run)
    (out / f"{name}.md").write_text(markdown)
    print(markdown)


def write_plot(path: Path, run: dict) -> bool:
    """The throughput and latency plot, where matplotlib is installed (`make test` and `make bench`
    install it; `make run` does not): False, with one line saying how to get it, where it is not."""
    try:
        import matplotlib
    except ImportError:
        print(f"No plot at {path}: matplotlib is not installed here (`{Path(sys.executable).parent / 'pip'} "
              "install matplotlib`, or `make bench`, installs it); the tables are written without it.", flush=True)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (agg, itl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target, levels in run["results"].items():
        if not levels:
            continue
        xs = [level["concurrency"] for level in levels]
        agg.plot(xs, [level["aggregate_tok_s"] or 0 for level in levels], marker="o", label=target)
        itl.plot(xs, [level["itl_p95_ms"] or 0 for level in levels], marker="o", label=target)
    for axis, label in ((agg, "aggregate output tokens/s"), (itl, "p95 inter-token latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    if agg.get_legend_handles_labels()[0]:  # a run of the wake alone has no lines
        agg.legend(fontsize=8)
    fig.suptitle(f"Textbot on {run['machine']['cores']} cores, {run['settings']['max_tokens']} tokens per reply, greedy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def targets(run: dict) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, checked against this run: (target, measured, met)."""
    results = run["results"]

    def level(target: str, concurrency: int) -> dict | None:
        return next((lv for lv in results.get(target) or [] if lv["concurrency"] == concurrency), None)

    checks = []
    engine1, http1 = level("engine", 1), level("http", 1)
    if engine1 and http1 and engine1["per_stream_tok_s"] and http1["per_stream_tok_s"]:
        ratio = http1["per_stream_tok_s"] / engine1["per_stream_tok_s"]
        checks.append(("HTTP single-stream decode >= 0.95x in-process",
                       f"{ratio:.2f}x ({http1['per_stream_tok_s']} vs {engine1['per_stream_tok_s']} tok/s)",
                       ratio >= 0.95))
        delta = http1["ttft_p50_ms"] - engine1["ttft_p50_ms"]
        checks.append(("HTTP time to first token <= in-process + 30 ms",
                       f"+{delta:.0f} ms ({http1['ttft_p50_ms']} vs {engine1['ttft_p50_ms']} ms)", delta <= 30))
    for target in ("engine", "http"):
        one, eight = level(target, 1), level(target, 8)
        if one and eight and one["aggregate_tok_s"]:
            ratio = eight["aggregate_tok_s"] / one["aggregate_tok_s"]
            checks.append((f"{target}: aggregate at 8 streams >= 3x one stream",
                           f"{ratio:.1f}x ({eight['aggregate_tok_s']} vs {one['aggregate_tok_s']} tok/s)", ratio >= 3))
            checks.append((f"{target}: p95 inter-token latency at 8 streams < 250 ms",
                           f"{eight['itl_p95_ms']} ms", eight["itl_p95_ms"] is not None and eight["itl_p95_ms"] < 250))
    http8, page8 = level("http", 8), level("page", 8)
    if http8 and page8 and http8["aggregate_tok_s"] and page8["aggregate_tok_s"]:
        ratio = page8["aggregate_tok_s"] / http8["aggregate_tok_s"]
        checks.append(("page: aggregate at 8 chats >= 0.9x the HTTP route's",
                       f"{ratio:.2f}x ({page8['aggregate_tok_s']} vs {http8['aggregate_tok_s']} tok/s)", ratio >= 0.9))
    if http8 and page8 and http8["ttft_p50_ms"] and page8["ttft_p50_ms"]:
        ratio = page8["ttft_p50_ms"] / http8["ttft_p50_ms"]
        checks.append(("page: median time to first token at 8 chats <= 1.5x the HTTP route's",
                       f"{ratio:.2f}x ({page8['ttft_p50_ms']} vs {http8['ttft_p50_ms']} ms)", ratio <= 1.5))
    if engine1 and engine1["per_stream_tok_s"]:
        checks.append(("single stream >= 50 tok/s", f"{engine1['per_stream_tok_s']} tok/s",
                       engine1["per_stream_tok_s"] >= 50))
    checks += peer_targets(run, level)
    for woken in run.get("wake") or []:
        ttft = woken.get("ttft_ms")
        checks.append((f"{woken['model']}: first token within {WAKE_TARGET_S} s of asking, from no replica",
                       f"{ttft / 1000:.1f} s" if ttft is not None else f"no token ({'; '.join(woken['errors'])})",
                       ttft is not None and ttft <= WAKE_TARGET_S * 1000))
    return checks


def llamacpp_models(run: dict) -> dict[str, dict]:
    """Served model name -> its llama-server's file, flags and result keys (bench's measure_llamacpp)."""
    return (run["settings"].get("llamacpp_server") or {}).get("models") or {}


def peer_targets(run: dict, level) -> list[tuple[str, str, bool]]:
    """Issue 28's targets against llama.cpp's own llama-server (8 slots, continuous batching) on the
    same file: the served route (or, with none measured, the engine in-process) beside the benchmark
    model's llama-server runs; then each model's OpenAI route by name (`models`) beside that model's."""
    checks = []
    ours_target = next((t for t in ("openai", "http", "engine") if level(t, 1) or level(t, 8)), None)
    if ours_target:
        checks += ratio_checks(ours_target, ours_target, list(run["settings"].get("llamacpp_threads") or {}), level)
    for name, peer in llamacpp_models(run).items():
        checks += ratio_checks(f"openai, model {name}", model_key("openai", name), peer.get("results") or [], level)
    return checks


def ratio_checks(who: str, ours_target: str, peers: list[str], level) -> list[tuple[str, str, bool]]:
    """`ours_target` at one stream and at 8 beside the fastest of the llama-server results `peers`
    there (their thread settings differ; the better one is the fair peer)."""

    def best_peer(streams: int, key: str) -> tuple[float, str] | None:
        found = [(lv[key], peer) for peer in peers if (lv := level(peer, streams)) and lv[key]]
        return max(found) if found else None

    checks = []
    for streams, key, wanted, what in ((1, "per_stream_tok_s", 0.9, "single-stream decode"),
                                       (8, "aggregate_tok_s", 1.2, "aggregate at 8 streams")):
        ours, theirs = level(ours_target, streams), best_peer(streams, key)
        if ours and ours[key] and theirs:
            ratio = ours[key] / theirs[0]
            checks.append((f"{who}: {what} >= {wanted}x llama-server",
                           f"{ratio:.2f}x ({ours[key]} vs {theirs[0]} tok/s, {theirs[1]})", ratio >= wanted))
    return checks


def llamacpp_lines(run: dict) -> list[str]:
    """The peer's command line per model, its version and endpoint: what a reader needs to run it again."""
    s = run["settings"]
    runs, server, models = s.get("llamacpp_threads") or {}, s.get("llamacpp_server") or {}, llamacpp_models(run)
    if not runs or "version" not in server or not models:
        return []
    counts = " and ".join(str(n) for n in runs.values())
    return [f"llama.cpp: one `llama-server` per model on the GGUF file Textbot loads, N = {counts} threads "
            f"(llama.cpp {server['version']}, built from llama-cpp-python's sdist by bench/llamacpp_build.py "
            "for this CPU's instruction sets, no AMX), streamed through its OpenAI-compatible API. Its slots "
            "decode together (continuous batching). A Textbot model replica decodes on "
            f"{s.get('textbot_threads')} torch thread(s) (its CPUs in deploy.yaml), and so does the engine "
            "in-process here.", "", *(peer_line(name, peer) for name, peer in models.items())]


def peer_line(name: str, peer: dict) -> str:
    """One model's llama-server: its command, context, endpoint and result keys."""
    endpoint = peer.get("endpoint", "/v1/chat/completions")
    base = (" (the model has no chat template: the prompt as the token ids Textbot builds)"
            if endpoint == "/v1/completions" else "")
    return (f"- {name}: `llama-server -m {Path(peer['gguf']).name} {' '.join(peer['flags'])}`, "
            f"{peer['slots']} slots of {peer['context'] // peer['slots']} tokens of context, through "
            f"`{endpoint}`{base}; results {', '.join(f'`{key}`' for key in peer['results'])}.")


def write_markdown(path: Path, run: dict, figure: str | None, data: str) -> None:
    """BENCHMARKS.md from `run`; `figure` the plot's path beside it, None when none was drawn."""
    m, s = run["machine"], run["settings"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{s['command']}` on {run['date']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; CPU flags: "
        f"{' '.join(m.get('cpu_flags') or []) or 'unknown'}"
        f"{' (no AMX)' if 'avx512f' in (m.get('cpu_flags') or []) and 'amx_tile' not in m['cpu_flags'] else ''}.",
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"llama.cpp {(s.get('llamacpp_server') or {}).get('version') or 'not measured'}.",
        f"Model: `{s['model']}` ({s.get('quantization', 'none')} weights, {s['dtype']} activations). "
        f"Each client sends {s['requests_per_client']} "
        f"request(s) of {s['max_tokens']} new tokens, greedy, from fixed prompts; all clients start together.",
        "Output tokens are counted by re-tokenising each reply with the model's tokenizer, for every target alike.",
        "Inter-token latency: gaps between streamed pieces, spread over the tokens each piece carried.",
        "Everything below ran side by side in one run on a shared machine: compare ratios, not absolutes."
        + (f" Load average (1, 5, 15 min) at the start {run['load_average']['start']}, at the end "
           f"{run['load_average']['end']}." if run.get("load_average") else ""),
        *llamacpp_lines(run),
        "",
        (f"![aggregate throughput and latency]({figure})  (data: [{Path(data).name}]({data}))" if figure
         else f"Data: [{Path(data).name}]({data}) (no plot: matplotlib was not installed)."),
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
        *(f"| {name} | {measured} | {'yes' if met else 'no'} |" for name, measured, met in targets(run)),
        "",
        *peer_lines(run),
        *wake_lines(run),
        *mixed_lines(run),
    ]
    for target, levels in run["results"].items():
        lines += [f"## {title(target, run)}", ""]
        if not levels:
            lines += [f"Not measured: {run['skipped'].get(target, 'not requested')}.", ""]
            continue
        lines += ["| streams | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | per-stream tok/s "
                  "| aggregate tok/s | errors |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {lv['concurrency']} | {lv['ttft_p50_ms']} | {lv['ttft_p95_ms']} | {lv['itl_p50_ms']} | "
                  f"{lv['itl_p95_ms']} | {lv['per_stream_tok_s']} | {lv['aggregate_tok_s']} | "
                  f"{lv['errors']}/{lv['requests']} |" for lv in levels]
        lines.append("")
    for target, reason in run["skipped"].items():
        if target not in run["results"]:
            lines += [f"## {title(target, run)}", "", f"Not measured: {reason}.", ""]
    notes = ""
    if path.is_file() and NOTES_MARKER in (old := path.read_text()):
        notes = old.split(NOTES_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + NOTES_MARKER + (notes or "\n"))
