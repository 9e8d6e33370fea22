"""`python -m bench.quality`: what each weight configuration does to the model's output and speed.

On a fixed text (bench/quality_text.md, this project's README as it was before the
quantised engine, about 4000 tokens; the first --tokens of it), each configuration
reads the text teacher-forced and is compared with the float32 reference: top-1
agreement (the share of positions where both predict the same next token) and
perplexity. Then one decode step is timed at 1 and 8 rows through the engine's own path.
Side by side in one run, so the ratios hold on a noisy machine.

Those rows read the text in one forward pass, as a prompt is read. Replies are decoded a
token a step, on other kernels (the int4 codes; `model.compile`: a compiled copy of the
step), so the int4 configuration is read that way too, a token a step, eager and compiled.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEXT = Path(__file__).with_name("quality_text.md")
CONFIGURATIONS = [("none", "float32"), ("none", "bfloat16"), ("int8", "float32"), ("int4", "float32"),
                  ("int4", "bfloat16")]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model source (default: deploy.yaml's)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the text to read (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a model replica)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "quality.json")
    args = parser.parse_args(argv)

    from backend.engine.loading import load
    from backend.settings import ModelSettings

    torch.set_num_threads(args.threads)
    source = {"source": args.model} if args.model else _deployed_model_source()
    results, reference = [], None
    for quantization, dtype in CONFIGURATIONS:
        # transformers' model object, for its forward over every position; the engine's own
        # Llama module holds the same weights and gives the same logits (tests/test_quant.py).
        loaded = load(ModelSettings(**source, quantization=quantization, dtype=dtype), transformers_model=True)
        ids = torch.tensor([loaded.tokenizer.encode(TEXT.read_text())[:args.tokens]])
        with torch.inference_mode():
            logits = loaded.model(input_ids=ids).logits[0, :-1].float()
        reference = logits if reference is None else reference
        row = {"quantization": quantization, "dtype": dtype, "tokens": ids.shape[1],
               "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
               "perplexity": math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()),
               **{f"step_ms_{rows}_rows": _step_ms(loaded, rows) for rows in (1, 8)}}
        results.append(row)
        print(_line(row, results[0]), flush=True)
    for compile in (False, True):
        loaded = load(ModelSettings(**source, quantization="int4", dtype="float32", compile=compile))
        ids = loaded.tokenizer.encode(TEXT.read_text())[:args.tokens]
        with torch.inference_mode():
            logits = _decode_step_logits(loaded, ids)
        row = {"quantization": "int4", "dtype": "float32", "tokens": len(ids),
               "read": "a token a step, " + ("compiled" if loaded.compiled else "eager"),
               "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
               "perplexity": math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()),
               **{f"step_ms_{rows}_rows": _step_ms(loaded, rows) for rows in (1, 8)}}
        results.append(row)
        print(_line(row, results[0]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return {"results": results}


def _deployed_model_source() -> dict:
    import yaml

    config = yaml.safe_load((ROOT / "deploy.yaml").read_text())
    app = next(a for a in config["applications"] if a["name"] == "textbot")
    return {"source": app["args"]["model"]["source"]}


def _decode_step_logits(loaded, ids: list[int]) -> torch.Tensor:
    """The next-token logits at every position but the last, reading `ids` as a reply is
    decoded: the first token as the prompt, then one token a step through the engine's path."""
    from backend.engine import slots

    model = loaded.model

    class Request:
        prompt_ids, next_token = ids[:1], None

    rows = slots.read_whole(model, [slots.PromptReader(model, Request())])
    batch = slots.Batch(model, rows=1)
    batch.add(rows)
    logits = [rows.logits[0]]
    for token in ids[1:-1]:
        batch.requests[0].next_token = token
        logits.append(batch.step()[0])
    return torch.stack(logits).float()


@torch.inference_mode()
def _step_ms(loaded, rows: int, steps: int = 20) -> float:
    """One decode step for `rows` sequences 64 tokens in, through the engine's path."""
    from backend.engine import Engine

    engine = Engine(loaded)
    try:
        path = engine.path

        class Request:
            prompt_ids, next_token = list(range(100, 164)), 200

        batch = path.Batch(loaded.model, rows)
        batch.add(path.read_whole(loaded.model, [path.PromptReader(loaded.model, Request()) for _ in range(rows)]))
        for _ in range(3):
            batch.step()
        started = time.perf_counter()
        for _ in range(steps):
            batch.step()
        return (time.perf_counter() - started) / steps * 1000
    finally:
        engine.shutdown()


def _line(row: dict, reference: dict) -> str:
    return (f"{row['quantization']:>5} weights, {row['dtype']:>8} activations"
            f"{' (' + row['read'] + ')' if 'read' in row else ''}: "
            f"top-1 agreement {row['top1_agreement'] * 100:6.2f} %, perplexity {row['perplexity']:.3f} "
            f"({(row['perplexity'] / reference['perplexity'] - 1) * 100:+.2f} %), decode step "
            f"{row['step_ms_1_rows']:.1f} ms at 1 row, {row['step_ms_8_rows']:.1f} ms at 8 "
            f"({1000 / row['step_ms_1_rows']:.0f} and {8000 / row['step_ms_8_rows']:.0f} tok/s)")


if __name__ == "__main__":
    main()
