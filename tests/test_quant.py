"""The quantised layers against the float weights they stand for, and the lean slot path
against Hugging Face's forward on the same model."""

import pytest
import torch

from backend.engine import quant, slots
from backend.engine.loading import load
from backend.engine.quant import GROUP, ONEDNN_BF16, Bf16Linear, Int4Linear, fuse
from backend.settings import ModelSettings


def _bf16_input() -> torch.Tensor:
    # The kernels take bfloat16 activations: compare on inputs that bfloat16 holds exactly.
    return torch.randn(3, 128).to(torch.bfloat16).float()


def test_int4_codes_are_used_as_they_are():
    codes = torch.randint(0, 16, (64, 128))
    scale, zero = torch.rand(64, 128 // GROUP) / 8, torch.randn(64, 128 // GROUP) / 8
    scale, zero = scale.to(torch.bfloat16).float(), zero.to(torch.bfloat16).float()  # stored in bfloat16
    weight = ((codes - 8).reshape(64, -1, GROUP) * scale[..., None] + zero[..., None]).reshape(64, 128)
    x = _bf16_input()
    torch.testing.assert_close(Int4Linear.from_codes(codes, scale, zero)(x), x @ weight.T, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("onednn", sorted({ONEDNN_BF16, False}))  # and the float32 fallback
@pytest.mark.parametrize("shape", [(1000, 128), (49152, 576)])  # the default model's output layer
def test_bfloat16_output_layer_gives_each_row_the_same_logits_alone_and_in_a_batch(shape, onednn, monkeypatch):
    monkeypatch.setattr(quant, "ONEDNN_BF16", onednn)
    weight = torch.randn(*shape).to(torch.bfloat16).float()  # values bfloat16 holds exactly
    layer = Bf16Linear.from_weight(weight)
    x = torch.randn(8, shape[1]).to(torch.bfloat16).float()  # a full decode batch
    together = layer(x)
    torch.testing.assert_close(together, x @ weight.T, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer(x[None])[0], together)  # any leading shape
    alone = torch.cat([layer(row[None]) for row in x])
    if onednn:  # bitwise: a greedy reply must not depend on the other rows of its step
        assert torch.equal(together, alone)
    else:  # float32 W·xᵀ, as the float path's output layer: equal up to float rounding
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_fused_layers_give_the_outputs_side_by_side():
    layers = [Int4Linear.quantize(torch.randn(n, 128)) for n in (128, 64, 64)]
    x = _bf16_input()
    torch.testing.assert_close(fuse(layers)(x), torch.cat([layer(x) for layer in layers], dim=-1))
    # Packed rows interleave in blocks of 64: layers of other sizes are not joined.
    assert fuse([Int4Linear.quantize(torch.randn(n, 128)) for n in (64, 32, 32)]) is None


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_slot_path_matches_hugging_face_forward(tiny_models, quantization):
    """The same layers, so the two paths differ by float rounding only: a prompt read whole, read
    in chunks, and then decoded in a batch with a shorter prompt beside it. (With int4, prompts
    go through the 4-bit codes here too, as in transformers' forward: their bfloat16 copies are
    let go; the next test covers those.)"""
    loaded = load(ModelSettings(source=str(tiny_models["tiny-chat"]), quantization=quantization))
    model = loaded.model
    assert slots.supports(model)
    for layer in model.modules():
        if isinstance(layer, Int4Linear):
            layer.dense = None
    long, short = list(range(5, 40)), list(range(7, 19))
    with torch.inference_mode():
        reference = [model(input_ids=torch.tensor([ids])).logits[0, -1] for ids in (long, short)]
        kv = slots.KV(model, 1, capacity=4)  # small: it must grow as the chunks arrive
        for start in range(0, len(long), 10):
            chunk = long[start:start + 10]
            logits = slots.forward(model, kv, torch.tensor([chunk]), torch.arange(start, start + len(chunk))[None])
        torch.testing.assert_close(logits[0], reference[0], rtol=1e-4, atol=1e-4)

        class Request:
            def __init__(self, ids):
                self.prompt_ids, self.next_token = ids, 3
        requests = [Request(long), Request(short)]
        rows = slots.read_whole(model, [slots.PromptReader(model, r) for r in requests])  # the short one right-padded
        for row, expected in zip(rows.logits, reference):
            torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4)
        batch = slots.Batch(model, rows=4)
        batch.add(rows)
        stepped = batch.step()
        for row, ids in zip(stepped, (long, short)):
            alone = model(input_ids=torch.tensor([ids + [3]])).logits[0, -1]
            torch.testing.assert_close(row, alone, rtol=1e-4, atol=1e-4)
        batch.keep([requests[1]])  # the long one retires; the short one moves up to row 0
        requests[1].next_token = 4
        after = batch.step()[0]
        torch.testing.assert_close(after, model(input_ids=torch.tensor([short + [3, 4]])).logits[0, -1],
                                   rtol=1e-4, atol=1e-4)


def test_int4_prompts_are_read_through_bfloat16_copies(tiny_models):
    """Prompts (several positions a row) go through each int4 layer's bfloat16 copy, decode
    steps through its 4-bit codes; the two stand for the same weights."""
    model = load(ModelSettings(source=str(tiny_models["tiny-chat"]), quantization="int4")).model
    ids = list(range(5, 40))
    with torch.inference_mode():
        four_bits = model(input_ids=torch.tensor([ids])).logits[0, -1]  # transformers' forward: int4 only
        read = slots.forward(model, slots.KV(model, 1), torch.tensor([ids]), torch.arange(len(ids))[None])[0]
    decode_layers, prompt_layers = slots._fused_layers(model)
    # Where the CPU has no bfloat16 dot products, prompts stay on the int4 kernel.
    for_prompts = Bf16Linear if ONEDNN_BF16 else Int4Linear
    assert all(isinstance(layer.gate_up, for_prompts) and isinstance(layer.down_proj, for_prompts)
               for layer in prompt_layers)
    assert all(isinstance(layer.gate_up, Int4Linear) and isinstance(layer.down_proj, Int4Linear)
               for layer in decode_layers)
    if ONEDNN_BF16:
        assert not torch.equal(read, four_bits)  # the copies were used
    # The copies hold the kernel's weights rounded to bfloat16 (8 significant bits): the logits move a little.
    assert (read - four_bits).abs().max() < 0.01 * four_bits.abs().max()


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_slot_path_decodes_with_bfloat16_activations(tiny_models, quantization):
    """`model.dtype: bfloat16`: the decode step's attention (its mask included) runs in the
    model's dtype, and its logits stay near transformers' forward in that dtype."""
    model = load(ModelSettings(source=str(tiny_models["tiny-chat"]), quantization=quantization,
                               dtype="bfloat16")).model

    class Request:
        prompt_ids, next_token = list(range(5, 40)), 3

    with torch.inference_mode():
        batch = slots.Batch(model, rows=2)
        batch.add(slots.read_whole(model, [slots.PromptReader(model, Request())]))
        stepped = batch.step()[0]
        expected = model(input_ids=torch.tensor([Request.prompt_ids + [3]])).logits[0, -1]
    assert stepped.dtype == torch.bfloat16
    torch.testing.assert_close(stepped.float(), expected.float(), rtol=0.02, atol=0.02)


def test_engine_llama_module_gives_hugging_face_logits(tiny_models):
    """backend/engine/llama.py, the module a converted copy loads into, is Llama as transformers
    computes it: same state dict names, same logits (both through the slot path and against
    transformers' own forward)."""
    import safetensors.torch
    from transformers import LlamaForCausalLM

    from backend.engine import llama

    folder = tiny_models["tiny-chat"]
    reference = LlamaForCausalLM.from_pretrained(folder).eval()
    config = llama.read_config(folder)
    assert llama.supports(config)
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    assert not llama.supports(config | {"rope_parameters": yarn})
    assert not llama.supports(config | {"rope_scaling": yarn})
    own = llama.empty_model(folder, config, torch.float32)
    assert own.state_dict().keys() == reference.state_dict().keys()
    own.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"), assign=True)
    assert own.generation_config.eos_token_id == reference.generation_config.eos_token_id
    ids = list(range(5, 40))
    with torch.inference_mode():
        expected = reference(input_ids=torch.tensor([ids])).logits[0, -1]
        for model in (own, reference):
            logits = slots.forward(model, slots.KV(model, 1), torch.tensor([ids]), torch.arange(len(ids))[None])
            torch.testing.assert_close(logits[0], expected, rtol=1e-5, atol=1e-5)
