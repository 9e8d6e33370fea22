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

`--gguf-types` (with `--model` a .gguf file) measures instead how each GGUF tensor type of the
file fares in each layer layout an int4 model can give it, against the file's own de-quantised
float weights: for each type, only its layers change (the file's 4-bit codes where the type has
them, 4 bits again, int8 per output channel, bfloat16), read as above, and their matrix products
are timed at 1 and 8 rows (each layer of the type in turn, as a decode step reads them). Then
whole int4 models: the layouts the engine chooses (gguf_blocks.LAYOUTS, or `--layouts`), and
4 bits again for everything but Q4_0/Q4_1, as before Q4_K ran on its own codes.
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
    parser.add_argument("--gguf-types", action="store_true",
                        help="per GGUF tensor type and layer layout, against the file's float weights")
    parser.add_argument("--layouts", action="append", default=[], help="with --gguf-types: a whole model's "
                        "layouts besides gguf_blocks.LAYOUTS, e.g. Q5_0=int8,Q8_0=bf16 (codes, int4, int8 "
                        "or bf16); may be given again")
    parser.add_argument("--types", default=None, help="with --gguf-types: the tensor types to study one by "
                        "one, e.g. Q5_0,Q6_K (default: all the file has; 'none' for the whole models only)")
    args = parser.parse_args(argv)
    if args.gguf_types:
        torch.set_num_threads(args.threads)
        return gguf_types(args)

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


LAYOUT_CHOICES = ("codes", "int4", "int8", "bf16")  # codes: the file's own 4-bit codes, where it has them


def gguf_types(args) -> dict:
    import copy
    from collections import Counter

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backend.engine.gguf_blocks import _BLOCK_BYTES, LAYOUTS, stored_weights, tensor_types
    from backend.engine.loading import LoadedModel, _context_length, _eos_token_ids
    from backend.engine.quant import quantize_model

    path = Path(args.model).expanduser().resolve()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    floats = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(TEXT.read_text())[:args.tokens]])
    reference = _logits(floats, ids)
    head = floats.get_output_embeddings()
    types = tensor_types(str(path), floats)
    linears = {name: module for name, module in floats.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not head}
    by_type = Counter(types[f"{name}.weight"] for name in linears)
    print(f"{path.name}: {args.tokens} tokens; linear layers by type {dict(by_type)}", flush=True)
    results = [{"model": path.name, "tokens": ids.shape[1], "layers": "all", "layout": "float32 (reference)",
                **_scores(reference, reference, ids)}]
    studied = sorted(by_type) if args.types is None else [kind for kind in args.types.split(",") if kind in by_type]
    for kind in studied:
        for layout in LAYOUT_CHOICES:
            if layout == "codes" and kind not in _BLOCK_BYTES:
                continue
            model = copy.deepcopy(floats)
            stored = stored_weights(str(path), model, {kind: layout})
            replaced = _replace(model, stored)
            row = {"model": path.name, "tokens": ids.shape[1], "layers": kind, "count": len(replaced),
                   "layout": layout, **_scores(_logits(model, ids), reference, ids),
                   **{f"matmul_us_{rows}_rows": _matmul_us(replaced, rows) for rows in (1, 8)}}
            results.append(row)
            print(_type_line(row), flush=True)
            del model
    wholes = [("chosen: " + _describe(LAYOUTS, by_type), LAYOUTS)]
    for option in args.layouts:
        layouts = LAYOUTS | dict(pair.split("=") for pair in option.split(",") if pair)
        wholes.append(("other: " + _describe(layouts, by_type), layouts))
    before = {kind: "codes" for kind in ("Q4_0", "Q4_1")}  # everything else: 4 bits again
    for label, layouts in wholes + [("before: all int4 but Q4_0/Q4_1", before)]:
        model = copy.deepcopy(floats)
        quantize_model(model, "int4", stored_weights(str(path), model, layouts))
        loaded = LoadedModel(path.stem, model, tokenizer, _context_length(model.config), _eos_token_ids(model, tokenizer))
        row = {"model": path.name, "tokens": ids.shape[1], "layers": "all (int4 model, output layer bfloat16)",
               "layout": label, **_scores(_logits(model, ids), reference, ids),
               **{f"step_ms_{rows}_rows": _step_ms(loaded, rows) for rows in (1, 8)}}
        results.append(row)
        print(_type_line(row), flush=True)
        del model, loaded
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return {"results": results}


@torch.inference_mode()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[0, :-1].float()


def _scores(logits: torch.Tensor, reference: torch.Tensor, ids: torch.Tensor) -> dict:
    return {"top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "perplexity": math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()),
            "reference_perplexity": math.exp(torch.nn.functional.cross_entropy(reference, ids[0, 1:]).item())}


def _replace(model, stored: dict) -> list[torch.nn.Module]:
    """Swap the linear layers `stored` names for their int4 model layers; not the output layer,
    which an int4 model keeps in bfloat16 whatever the file stores (a tied Q8_0 embedding here)."""
    from backend.engine.quant import int4_model_layer

    head = model.get_output_embeddings()
    wanted = {id(model.get_parameter(name)): weight for name, weight in stored.items()}
    replaced = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear) and child is not head and id(child.weight) in wanted:
                replaced.append(int4_model_layer(child, wanted[id(child.weight)], prompt_copies=False))
                setattr(parent, name, replaced[-1])
    return replaced


@torch.inference_mode()
def _matmul_us(layers: list[torch.nn.Module], rows: int, rounds: int = 20) -> float:
    """Microseconds for one pass over `layers`, one after the other as a decode step calls
    them (so each reads its weights from memory, not from a cache a repeated call would warm)."""
    inputs = [torch.randn(rows, layer.in_features) for layer in layers]
    for layer, x in zip(layers, inputs):
        layer(x)
    started = time.perf_counter()
    for _ in range(rounds):
        for layer, x in zip(layers, inputs):
            layer(x)
    return (time.perf_counter() - started) / rounds * 1e6


def _describe(layouts: dict, present: dict) -> str:
    return ", ".join(f"{kind} {layouts.get(kind, 'int4')}" for kind in sorted(present))


def _type_line(row: dict) -> str:
    speed = (f"matmuls {row['matmul_us_1_rows']:.0f} us at 1 row, {row['matmul_us_8_rows']:.0f} at 8"
             if "matmul_us_1_rows" in row else
             f"decode step {row['step_ms_1_rows']:.1f} ms at 1 row, {row['step_ms_8_rows']:.1f} ms at 8")
    return (f"{row['layers']:>6} {row['layout']:>6}: top-1 agreement {row['top1_agreement'] * 100:6.2f} %, "
            f"perplexity {row['perplexity']:.3f} ({(row['perplexity'] / row['reference_perplexity'] - 1) * 100:+.2f} %), "
            + speed)


def _deployed_model_source() -> dict:
    """deploy.yaml's default model's source (the textbot application's first model)."""
    from bench.__main__ import deployed

    return {"source": deployed().default.source}


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
