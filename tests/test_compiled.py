"""The compiled decode step (backend/engine/compiled.py): the default model decodes through
it, a row's tokens barely depend on the rows beside it, its logits stay those of the eager
step up to float rounding, and anything that keeps it from loading leaves the engine eager."""

import logging

import torch

from backend.config import DeployConfig
from backend.engine import compiled, slots
from backend.engine.loading import load
from backend.settings import ModelSettings


class _Request:
    def __init__(self, ids: list[int]):
        self.prompt_ids, self.next_token = ids, None


def _greedy(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Each prompt read alone (prompts are not what is tested), then decoded together greedily."""
    batch = slots.Batch(model, rows=len(prompts))
    for ids in prompts:
        rows = slots.read_whole(model, [slots.PromptReader(model, _Request(ids))])
        rows.requests[0].next_token = int(rows.logits[0].argmax())
        batch.add(rows)
    replies = [[r.next_token] for r in batch.requests]
    for _ in range(steps):
        for request, reply, token in zip(batch.requests, replies, batch.step().argmax(-1).tolist()):
            request.next_token = token
            reply.append(token)
    return replies


def test_default_model_decodes_compiled_alone_as_in_a_batch_and_close_to_eager():
    settings = DeployConfig.read().textbot().default.model_settings()
    assert settings.compile  # deploy.yaml asks for it; `make test` built it before the tests
    loaded = load(settings)
    assert loaded.compiled
    model, tokenizer = loaded.model, loaded.tokenizer
    assert not isinstance(slots.decode_step(model), slots.DecodeStep)
    question = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                                              add_generation_prompt=True, tokenize=False))
    others = [tokenizer.encode("The history of the printing press begins"), tokenizer.encode("def fib(n):")]
    with torch.inference_mode():
        alone = _greedy(model, [question], steps=24)[0]
        beside_others = _greedy(model, [others[0], question, others[1]], steps=24)[1]
        # A row's logits move in the last bits with the rows beside it (compiled.py's docstring):
        # a greedy reply may part from its lone self at a near tie, late; a row that read another's
        # cache, or positions, would part at once.
        parted = next((i for i, (a, b) in enumerate(zip(alone, beside_others)) if a != b), len(alone))
        assert parted >= 12, (alone, beside_others)

        # The same step, compiled and eager, from the same cache: the numbers agree up to rounding.
        compiled_step = slots.decode_step(model)
        rows = slots.read_whole(model, [slots.PromptReader(model, _Request(question))])
        kv = rows.kv
        token, position = torch.tensor([[alone[0]]]), torch.tensor([[len(question)]])
        logits = {}
        for name, step in (("compiled", compiled_step), ("eager", slots.DecodeStep(model))):
            slots.use_decode_step(model, step)
            logits[name] = slots.forward(model, kv, token, position)[0]
        slots.use_decode_step(model, compiled_step)
    assert logits["compiled"].argmax() == logits["eager"].argmax()
    scale = logits["eager"].abs().max()
    print("compiled vs eager, largest logit difference:", float((logits["compiled"] - logits["eager"]).abs().max()),
          "of", float(scale))
    assert (logits["compiled"] - logits["eager"]).abs().max() < 0.02 * scale
    assert tokenizer.decode(alone).strip()  # it said something


def test_a_broken_compiled_step_leaves_decoding_eager(tiny_models, tmp_path, caplog):
    model = load(ModelSettings(source=str(tiny_models["tiny-chat"]), quantization="int4")).model
    compiled.package_path(tmp_path).write_bytes(b"not a package")
    with caplog.at_level(logging.WARNING, logger="backend.engine.compiled"):
        assert compiled.attach(model, tmp_path) is False
    assert "Decode steps run eagerly: could not load the compiled step" in caplog.text
    assert isinstance(slots.decode_step(model), slots.DecodeStep)
    with torch.inference_mode():  # and the model still decodes
        assert len(_greedy(model, [[5, 6, 7]], steps=3)[0]) == 4


def test_without_a_compiler_the_log_says_what_to_install(tiny_models, tmp_path, caplog, monkeypatch):
    model = load(ModelSettings(source=str(tiny_models["tiny-chat"]), quantization="int4")).model
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="backend.engine.compiled"):
        assert compiled.attach(model, tmp_path) is False
    assert "no C++ compiler" in caplog.text and "apt-get install g++" in caplog.text
    assert not compiled.package_path(tmp_path).exists()


def test_compile_on_a_model_without_converted_weights_runs_eagerly_and_says_why(tiny_models, caplog):
    with caplog.at_level(logging.WARNING, logger="backend.engine.loading"):
        loaded = load(ModelSettings(source=str(tiny_models["tiny-chat"]), compile=True))
    assert loaded.compiled is False
    assert "the compiled step is kept with the converted weights" in caplog.text
    assert isinstance(slots.decode_step(loaded.model), slots.DecodeStep)


def test_a_gemma_decode_step_compiles_and_decodes_alone_as_in_a_batch_and_as_eager(tmp_path):
    """The family with the most differences (sliding windows of 8 positions, per-head norms, two
    rotary tables, norms after attention and the MLP) through the same export and compiler."""
    from tests.tiny_models import build_tiny_family

    model = load(ModelSettings(source=str(build_tiny_family(tmp_path / "gemma3", "gemma3")),
                               quantization="int4")).model
    assert compiled.attach(model, tmp_path)
    compiled_step = slots.decode_step(model)
    assert not isinstance(compiled_step, slots.DecodeStep)
    prompts = [list(range(5, 17)), list(range(20, 25)), list(range(30, 50))]
    with torch.inference_mode():
        together = _greedy(model, prompts, steps=16)  # past the window
        assert together[1] == _greedy(model, [prompts[1]], steps=16)[0]
        slots.use_decode_step(model, slots.DecodeStep(model))
        eager = _greedy(model, prompts, steps=16)
    # A random model's logits can be near-tied, so compare where the two first part, if they do.
    agree = sum(a == b for row_c, row_e in zip(together, eager) for a, b in zip(row_c, row_e))
    assert agree >= 0.9 * sum(map(len, together)), (together, eager)
