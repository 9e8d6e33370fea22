"""Where a decode step goes, and what sharing its process costs it: `python -m bench.step`.

In-process, the default model (deploy.yaml's settings), the engine's slot path, `--context`
tokens already read in every row:

A. one decode step at 1 and 8 rows, on 1 and 2 torch threads, eager and (1 thread) through the
   compiled copy of the step (`model.compile`, backend/engine/compiled.py);
B. the same step while another thread of the process runs Python for a share of the time
   (`--busy`), as a model replica's event loop does while it streams the replies through
   Ray: the decode loop gives up the GIL around every torch op and must win it back;
C. the step's time by operator at 8 rows (torch.profiler).

Rounds alternate the variants, medians are reported (the machine is shared).
Writes docs/benchmarks/step.json and docs/benchmarks/step.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import threading
import time
from pathlib import Path

import torch

from bench.report import write_side_study

ROOT = Path(__file__).resolve().parent.parent
# A decode step's attention is two batched matmuls and a softmax (slots._decode_attention);
# the output layer is a bfloat16 oneDNN matmul (quant.Bf16Linear).
OPERATORS = {"aten::_weight_int4pack_mm_for_cpu": "int4 matmuls",
             "mkldnn::_linear_pointwise": "output layer (bfloat16)",
             "aten::baddbmm": "attention", "aten::bmm": "attention", "aten::_softmax": "attention"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=200, help="tokens in each row before the timed steps")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=float, nargs="+", default=[0.1, 0.2],
                        help="shares of the time the other thread runs Python (B)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    if args.context < 1 or args.steps < 1 or args.rounds < 1 or not all(0 < b < 1 for b in args.busy):
        parser.error("--context, --steps and --rounds must be positive; --busy shares between 0 and 1")
    return args


class Steps:
    """`rows` requests `context` tokens in, decoding on the slot path."""

    def __init__(self, model, rows: int, context: int):
        from backend.engine import slots

        class Request:
            prompt_ids, next_token = list(range(100, 100 + context)), 200

        self.model, self.batch = model, slots.Batch(model, rows)
        readers = [slots.PromptReader(model, Request()) for _ in range(rows)]
        self.batch.add(slots.read_whole(model, readers))
        self.start_length = context

    def time_ms(self, steps: int) -> float:
        for request in self.batch.requests:  # the same context length for every measurement
            request.length = self.start_length
        self.batch.step()
        started = time.perf_counter()
        for _ in range(steps):
            self.batch.step()
        return (time.perf_counter() - started) / steps * 1000


class PythonLoad:
    """Another thread running pure Python `share` of the time, in 0.5 ms bursts."""

    def __init__(self, share: float):
        self.burst_s, self.rest_s = 0.0005, 0.0005 * (1 - share) / share
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            until = time.perf_counter() + self.burst_s
            while time.perf_counter() < until:
                sum(range(100))
            time.sleep(self.rest_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@torch.inference_mode()
def measure(args: argparse.Namespace) -> dict:
    from backend.engine import slots
    from backend.engine.loading import load
    from bench.quality import _deployed_model_source
    from backend.settings import ModelSettings

    settings = ModelSettings(**_deployed_model_source(), quantization="int4", dtype="float32")
    loaded = load(settings)
    if not slots.supports(loaded.model):
        raise SystemExit("bench.step times the slot path: the model must be of a family the engine runs (backend/engine/families)")
    compiled = load(settings.model_copy(update={"compile": True}))
    if not compiled.compiled:
        raise SystemExit("bench.step: the compiled step could not be built or loaded (the log says why)")
    batches = {(rows, False): Steps(loaded.model, rows, args.context) for rows in (1, 8)}
    batches |= {(rows, True): Steps(compiled.model, rows, args.context) for rows in (1, 8)}
    variants = [(rows, threads, None, False) for rows in (1, 8) for threads in (1, 2)]
    variants += [(rows, 1, None, True) for rows in (1, 8)]
    variants += [(rows, 1, share, False) for rows in (1, 8) for share in args.busy]
    samples: dict[tuple, list[float]] = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for rows, threads, share, is_compiled in variants:
            torch.set_num_threads(threads)
            steps = batches[(rows, is_compiled)]
            if share is None:
                samples[(rows, threads, share, is_compiled)].append(steps.time_ms(args.steps))
            else:
                with PythonLoad(share):
                    samples[(rows, threads, share, is_compiled)].append(steps.time_ms(args.steps))
    torch.set_num_threads(1)
    with torch.profiler.profile() as profile:
        batches[(8, False)].time_ms(args.steps)
    by_operator = {name: 0.0 for name in OPERATORS.values()}
    total = 0.0
    for event in profile.key_averages():
        total += event.self_cpu_time_total
        if event.key in OPERATORS:
            by_operator[OPERATORS[event.key]] += event.self_cpu_time_total
    by_operator["everything else"] = total - sum(by_operator.values())
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": settings.source, "context": args.context, "steps": args.steps, "rounds": args.rounds,
        "steps_ms": [{"rows": rows, "threads": threads, "python_share": share, "compiled": is_compiled,
                      "median_ms": round(statistics.median(values), 2), "all_ms": [round(v, 2) for v in values]}
                     for (rows, threads, share, is_compiled), values in samples.items()],
        "operators_ms_per_step_8_rows": {name: round(us / 1000 / (args.steps + 1), 2)
                                         for name, us in by_operator.items()},
    }


def markdown(run: dict) -> str:
    base = {(r["rows"], r["threads"]): r["median_ms"] for r in run["steps_ms"]
            if r["python_share"] is None and not r.get("compiled")}
    lines = [f"# A decode step ({run['date']})", "",
             f"`python -m bench.step`: {run['model']}, int4, every row {run['context']} tokens in, "
             f"medians of {run['rounds']} rounds of {run['steps']} steps.", "",
             "| rows | step | torch threads | another thread runs Python | step ms | vs eager alone on 1 thread |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in run["steps_ms"]:
        share = "-" if r["python_share"] is None else f"{r['python_share']:.0%} of the time"
        lines.append(f"| {r['rows']} | {'compiled' if r.get('compiled') else 'eager'} | {r['threads']} | {share} | "
                     f"{r['median_ms']} | "
                     f"{r['median_ms'] / base[(r['rows'], 1)]:.2f}x |")
    lines += ["", "At 8 rows, one thread, eager, per step (torch.profiler, self time):", "",
              "| part | ms |", "| --- | ---: |"]
    lines += [f"| {name} | {ms} |" for name, ms in run["operators_ms_per_step_8_rows"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = measure(args)
    write_side_study(args.out, "step", run, markdown(run))
    return run


if __name__ == "__main__":
    main()
