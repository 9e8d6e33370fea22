"""Every family the engine's own transformer runs (backend/engine/families/), against transformers'
model on the same weights: tiny random models of each, built here."""

import asyncio

import pytest
import torch

from backend.engine import Engine, families, modules, slots
from backend.engine.loading import load
from backend.engine.quant import Int4Linear
from backend.protocol import ChatMessage, ResolvedSampling
from backend.settings import ModelSettings
from tests import tiny_models

FAMILIES = ["qwen2", "qwen3", "gemma3", "mistral"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory) -> tuple[str, object]:
    return request.param, tiny_models.build_tiny_family(tmp_path_factory.mktemp(request.param), request.param)


class _Request:
    def __init__(self, ids, next_token=3):
        self.prompt_ids, self.next_token = ids, next_token


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_the_slot_path_gives_transformers_logits_for_each_family(family_model, quantization):
    """A prompt longer than the sliding windows read whole and in chunks, then decoded in a batch
    beside a shorter one: the logits are transformers' own, up to float rounding."""
    name, source = family_model
    model = load(ModelSettings(source=str(source), quantization=quantization)).model
    assert slots.why_not(model) is None
    for layer in model.modules():  # prompts through the same int4 codes as transformers' forward
        if isinstance(layer, Int4Linear):
            layer.dense = None
    long, short = list(range(5, 40)), list(range(7, 19))
    with torch.inference_mode():
        reference = [model(input_ids=torch.tensor([ids])).logits[0, -1] for ids in (long, short)]
        kv = slots.KV(model, 1, capacity=4)
        for start in range(0, len(long), 10):
            chunk = long[start:start + 10]
            logits = slots.forward(model, kv, torch.tensor([chunk]), torch.arange(start, start + len(chunk))[None])
        torch.testing.assert_close(logits[0], reference[0], rtol=1e-4, atol=1e-4)

        requests = [_Request(long), _Request(short)]
        rows = slots.read_whole(model, [slots.PromptReader(model, r) for r in requests])
        for row, expected in zip(rows.logits, reference):
            torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4)
        batch = slots.Batch(model, rows=4)
        batch.add(rows)
        for request in requests:
            request.generated = []
        for _ in range(12):  # decoded past the sliding windows of both
            stepped = batch.step()
            for request, row in zip(requests, stepped):
                request.generated.append(request.next_token)
                request.next_token = int(row.argmax())
        for request, row in zip(requests, stepped):
            alone = model(input_ids=torch.tensor([request.prompt_ids + request.generated])).logits[0, -1]
            torch.testing.assert_close(row, alone, rtol=1e-4, atol=1e-4)


def test_the_engine_replies_greedily_as_transformers_generate_does(family_model):
    """A chat through the engine, its reply grown past the sliding windows, is transformers'
    greedy `generate` on the same weights, token for token."""
    name, source = family_model
    loaded = load(ModelSettings(source=str(source), quantization="none"))
    engine = Engine(loaded)
    messages = [ChatMessage(role="user", content="Hello there! How are you today?")]
    sampling = ResolvedSampling(max_new_tokens=16, temperature=0.0, top_p=1.0)

    async def reply():
        generation = engine.submit(messages, sampling)
        return "".join([piece async for piece in generation])
    try:
        text = asyncio.run(reply())
    finally:
        engine.shutdown()
    prompt = loaded.tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in messages],
                                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = loaded.model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)[0, prompt.shape[1]:]
    assert text and text == loaded.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", *FAMILIES])
def test_the_engines_own_modules_hold_each_family_as_transformers_model_does(family, tmp_path):
    """A converted copy loads into modules.py's plain modules, not transformers' model: the same
    parameter names (so the saved state dict fits, biases and norms where the family has them),
    and the same logits through the slot path, read whole and stepped."""
    source = (tiny_models.build_tiny_chat_model(tmp_path) if family == "llama"
              else tiny_models.build_tiny_family(tmp_path, family))
    theirs = load(ModelSettings(source=str(source), quantization="none")).model
    state = theirs.state_dict()
    config = modules.read_config(source)
    assert modules.supports(config)
    ours = modules.empty_model(source, config, torch.float32, list(state))
    ours.load_state_dict(state, assign=True)  # strict: every name on both sides
    assert slots.why_not(ours) is None
    prompt = list(range(5, 30))  # longer than the sliding windows (8)
    with torch.inference_mode():
        logits = []
        for model in (theirs, ours):
            kv = slots.KV(model, 1, capacity=4)
            read = slots.forward(model, kv, torch.tensor([prompt]), torch.arange(len(prompt))[None])
            stepped = slots.forward(model, kv, torch.tensor([[7]]), torch.tensor([[len(prompt)]]))
            logits.append((read, stepped))
    for mine, reference in zip(logits[1], logits[0]):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


def test_an_unknown_family_says_why_it_runs_through_transformers():
    assert "'gpt2' architecture has no family file" in families.why_not({"model_type": "gpt2"})
    assert "softcapping" in families.why_not({"model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
                                              "final_logit_softcapping": 30.0})
    assert families.why_not({"model_type": "llama", "hidden_act": "silu"}) is None
