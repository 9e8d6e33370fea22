"""The quantised layers against the float weights they stand for, and the lean slot path
against Hugging Face's forward on the same model."""

import numpy as np  # noqa: F401 - named in annotations
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


def test_int4_prompts_are_read_on_the_int4_weights_unless_asked(tiny_models):
    """By default an int4 model keeps no bfloat16 copies (model.prompt_weights: int4): prompts go
    through the same 4-bit codes as decode steps, so the copies cost no memory."""
    model = load(ModelSettings(source=str(tiny_models["tiny-chat"]), quantization="int4")).model
    assert not any(getattr(layer, "dense", None) is not None for layer in model.modules())
    decode_layers, prompt_layers = slots._fused_layers(model)
    assert all(isinstance(part, Int4Linear) for layer in prompt_layers for part in (layer.gate_up, layer.down_proj))


def test_int4_prompts_are_read_through_bfloat16_copies(tiny_models):
    """With model.prompt_weights: bfloat16, prompts (several positions a row) go through each int4
    layer's bfloat16 copy, decode steps through its 4-bit codes; the two stand for the same weights."""
    model = load(ModelSettings(source=str(tiny_models["tiny-chat"]), quantization="int4",
                               prompt_weights="bfloat16")).model
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
    """backend/engine/modules.py, the modules a converted copy loads into, is Llama as transformers
    computes it: same state dict names, same logits (both through the slot path and against
    transformers' own forward). Rotary scaling is left to transformers."""
    import safetensors.torch
    from transformers import LlamaForCausalLM

    from backend.engine import modules

    folder = tiny_models["tiny-chat"]
    reference = LlamaForCausalLM.from_pretrained(folder).eval()
    config = modules.read_config(folder)
    assert modules.supports(config)
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    assert not modules.supports(config | {"rope_parameters": yarn})
    assert not modules.supports(config | {"rope_scaling": yarn})
    own = modules.empty_model(folder, config, torch.float32, list(reference.state_dict()))
    assert own.state_dict().keys() == reference.state_dict().keys()
    own.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"), assign=True)
    assert own.generation_config.eos_token_id == reference.generation_config.eos_token_id
    ids = list(range(5, 40))
    with torch.inference_mode():
        expected = reference(input_ids=torch.tensor([ids])).logits[0, -1]
        for model in (own, reference):
            logits = slots.forward(model, slots.KV(model, 1), torch.tensor([ids]), torch.arange(len(ids))[None])
            torch.testing.assert_close(logits[0], expected, rtol=1e-5, atol=1e-5)


# --- A GGUF file's tensor types (gguf_blocks): each against gguf-py's own de-quantisation ---

def _k_blocks(kind: str, count: int, rng) -> "np.ndarray":
    """`count` super-blocks of a K type from random bytes (gguf-py cannot quantise to K types),
    with sane float16 scales where the type keeps them: d and dmin first (Q4_K, Q5_K), d last (Q6_K)."""
    import gguf
    import numpy as np

    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
    blocks = rng.integers(0, 256, (count, size), dtype=np.uint8)
    scales = lambda: rng.uniform(1e-4, 3e-3, (count, 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    if kind == "Q6_K":
        blocks[:, -2:] = scales()
    else:
        blocks[:, 0:2], blocks[:, 2:4] = scales(), scales()
    return blocks


def _raw(kind: str, shape: tuple[int, int], rng) -> "np.ndarray":
    """A [rows, columns] weight stored as `kind`: rows of raw blocks (uint8), or floats for F16/BF16/F32."""
    import gguf
    import numpy as np

    floats = rng.standard_normal(shape).astype(np.float32) / 20
    if kind in ("F32", "F16"):
        return floats.astype(np.float32 if kind == "F32" else np.float16)
    if kind.endswith("_K"):
        block_weights, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        return _k_blocks(kind, shape[0] * shape[1] // block_weights, rng).reshape(shape[0], -1)
    return gguf.quants.quantize(floats, gguf.GGMLQuantizationType[kind])


def _dequantize(raw, kind: str) -> torch.Tensor:
    import gguf
    import numpy as np

    return torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])).copy()).float()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_4bit_gguf_blocks_are_the_int4_kernels_format_exactly(kind):
    """codes, scale and zero stand for the file's weights exactly, and the int4 layer built from
    them multiplies by those weights (up to the kernel's bfloat16 scales and activations)."""
    import numpy as np

    from backend.engine.gguf_blocks import int4_codes

    raw = _raw(kind, (64, 512), np.random.default_rng(0))
    stored = int4_codes(raw, kind)
    assert stored.codes.shape == (64, 512) and int(stored.codes.min()) >= 0 and int(stored.codes.max()) <= 15
    groups = (stored.codes.double() - 8).reshape(64, -1, GROUP) * stored.scale[..., None] + stored.zero[..., None]
    expected = _dequantize(raw, kind)
    assert torch.equal(groups.reshape(64, 512).float(), expected)  # bit for bit
    x = torch.randn(3, 512).to(torch.bfloat16).float()
    y = Int4Linear.from_codes(stored.codes, stored.scale, stored.zero)(x)
    torch.testing.assert_close(y, x @ expected.T, rtol=0.02, atol=0.02 * float((x @ expected.T).abs().max()))


def test_q4_k_subblock_scales_and_mins_unpack_as_llama_cpp_packs_them():
    """A hand-made Q4_K block: scale s and min m of sub-block j chosen, codes all 1: weight = d s - dmin m."""
    import numpy as np

    from backend.engine.gguf_blocks import int4_codes

    scales, mins = [1, 2, 3, 63, 17, 40, 5, 62], [0, 9, 33, 63, 1, 48, 16, 31]
    packed = np.zeros(12, dtype=np.uint8)
    for j in range(4):  # bytes 0-3: scale low 6 bits | top bits of scale j + 4; bytes 4-7 likewise for mins
        packed[j] = (scales[j] & 63) | (scales[j + 4] >> 4) << 6
        packed[j + 4] = (mins[j] & 63) | (mins[j + 4] >> 4) << 6
        packed[j + 8] = (scales[j + 4] & 0xF) | (mins[j + 4] & 0xF) << 4
    block = np.concatenate([np.array([1.0, 0.5], dtype=np.float16).view(np.uint8), packed,
                            np.full(128, 0x11, dtype=np.uint8)])
    stored = int4_codes(block[None], "Q4_K")
    weights = ((stored.codes.double() - 8).reshape(1, 8, GROUP) * stored.scale[..., None] + stored.zero[..., None])
    assert weights[0, :, 0].tolist() == [s - 0.5 * m for s, m in zip(scales, mins)]
    assert torch.equal(weights.reshape(1, 256).float(), _dequantize(block[None], "Q4_K"))


# Two Llama blocks whose weights are stored in every type a Q4_K_M file (and others) mixes.
_TINY_GGUF_TYPES = [
    {"attn_q": "F16", "attn_k": "BF16", "attn_v": "Q5_1", "attn_output": "Q4_K",
     "ffn_gate": "Q5_0", "ffn_up": "Q4_1", "ffn_down": "Q5_K"},
    {"attn_q": "Q4_0", "attn_k": "F32", "attn_v": "Q8_0", "attn_output": "Q5_0",
     "ffn_gate": "Q4_1", "ffn_up": "Q6_K", "ffn_down": "Q4_K"},
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A 2-block Llama as a GGUF file with tensors of each type, and a transformers model of its
    shape holding the file's de-quantised float weights (as transformers would load it)."""
    import gguf
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    from backend.engine import gguf_blocks

    rng = np.random.default_rng(1)
    hidden, inner, vocab = 256, 512, 64
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden // 2, hidden), "attn_v": (hidden // 2, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (inner, hidden), "ffn_up": (inner, hidden),
              "ffn_down": (hidden, inner)}
    tensors = {"token_embd.weight": ("Q8_0", (vocab, hidden)), "output.weight": ("Q6_K", (vocab, hidden)),
               "output_norm.weight": ("F32", (1, hidden))}
    for block, types in enumerate(_TINY_GGUF_TYPES):
        tensors |= {f"blk.{block}.{name}.weight": (kind, shapes[name]) for name, kind in types.items()}
        tensors |= {f"blk.{block}.{norm}.weight": ("F32", (1, hidden)) for norm in ("attn_norm", "ffn_norm")}
    for name, (kind, shape) in tensors.items():
        raw = _raw(kind, shape, rng)
        raw = raw[0] if shape[0] == 1 else raw
        writer.add_tensor(name, raw, raw_dtype=None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, kind, raw in gguf_blocks._tensors(str(path), model):
            model.get_parameter(name).copy_(_dequantize(raw(), kind).reshape(model.get_parameter(name).shape))
    return path, model


def test_each_gguf_type_gets_its_layout_in_an_int4_model(tiny_gguf):
    """Q4_0/Q4_1/Q4_K: the file's own codes, exactly its weights; the 5- to 8-bit types: int8 or
    bfloat16 layers (gguf_blocks.LAYOUTS); F16/BF16/F32: 4 bits as before (not stored); the output
    layer bfloat16."""
    import copy

    from backend.engine.gguf_blocks import LAYOUTS, stored_weights, tensor_types
    from backend.engine.quant import Int4Codes, Int8Linear

    path, floats = tiny_gguf
    types = tensor_types(str(path), floats)
    stored = stored_weights(str(path), floats)
    layers = {"codes": Int4Linear, "int8": Int8Linear, "bf16": Bf16Linear}
    expected_layers = {kind: layers[layout] for kind, layout in LAYOUTS.items()}
    expected_layers |= {"F16": Int4Linear, "BF16": Int4Linear, "F32": Int4Linear}
    assert expected_layers["Q4_K"] is Int4Linear and expected_layers["Q5_0"] is not Int4Linear
    for name, kind in types.items():
        if kind in ("Q4_0", "Q4_1", "Q4_K"):
            codes = stored[name]
            assert isinstance(codes, Int4Codes)
            rows = codes.codes.shape[0]
            weight = (codes.codes.double() - 8).reshape(rows, -1, GROUP) * codes.scale[..., None] + codes.zero[..., None]
            assert torch.equal(weight.reshape(rows, -1).float(), floats.get_parameter(name).data)
        elif kind in ("F16", "BF16", "F32"):
            assert name not in stored
        else:
            assert stored[name] == LAYOUTS[kind] and LAYOUTS[kind] in ("int8", "bf16")
    model = copy.deepcopy(floats)
    quant.quantize_model(model, "int4", stored)
    assert isinstance(model.lm_head, Bf16Linear)  # the output layer (Q6_K here) stays bfloat16, as before
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float()
    seen = set()
    for name, module in floats.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            kind, layer = types[f"{name}.weight"], model.get_submodule(name)
            assert isinstance(layer, expected_layers[kind]), (name, kind)
            seen.add(kind)
            inputs = x[:, :module.in_features]
            if kind in ("F16", "BF16", "F32"):  # 4 bits at load, as from any float weights: that layer exactly
                assert torch.equal(layer(inputs), Int4Linear.quantize(module.weight.data)(inputs)), (name, kind)
                continue
            exact = inputs @ module.weight.T  # codes and 8 bits: the kernels' bfloat16 rounding only
            assert (layer(inputs) - exact).abs().max() <= 0.02 * exact.abs().max(), (name, kind)
    assert seen == set(expected_layers)


def test_mixed_layers_survive_the_converted_cache(tiny_gguf, tmp_path):
    """The converted copy's config records which layers are int8 or bfloat16, so its empty shells take
    the saved tensors (a strict load) and give the same logits."""
    import copy

    import safetensors.torch
    from transformers import AutoConfig, LlamaForCausalLM

    from backend.engine.gguf_blocks import LAYOUTS, stored_weights
    from backend.engine.quant import LAYER_LAYOUTS, Int8Linear

    path, floats = tiny_gguf
    model = copy.deepcopy(floats)
    # All three kinds of layer: Q8_0 in int8 here (an int8 layer's loaded tensors must be aligned, too).
    quant.quantize_model(model, "int4", stored_weights(str(path), model, LAYOUTS | {"Q8_0": "int8"}))
    recorded = getattr(model.config, LAYER_LAYOUTS)
    assert recorded["model.layers.0.mlp.gate_proj"] == LAYOUTS["Q5_0"] == "bf16"
    assert recorded["model.layers.1.self_attn.v_proj"] == "int8"
    assert "model.layers.0.self_attn.o_proj" not in recorded  # Q4_K: int4, the default
    model.config.save_pretrained(tmp_path)
    safetensors.torch.save_model(model, str(tmp_path / "model.safetensors"))

    shell = LlamaForCausalLM(AutoConfig.from_pretrained(tmp_path)).eval()
    quant.quantize_model(shell, "int4", empty=True)
    assert isinstance(shell.model.layers[1].self_attn.v_proj, Int8Linear)  # Q8_0
    assert isinstance(shell.model.layers[1].self_attn.q_proj, Int4Linear)  # Q4_0
    assert type(shell.model.layers[0].mlp.gate_proj) is type(model.model.layers[0].mlp.gate_proj)  # Q5_0
    shell.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"), assign=True, strict=True)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.inference_mode():
        assert torch.equal(shell(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("make", ["int8", "bf16"])
def test_int8_and_bfloat16_layers_fuse_side_by_side(make):
    from backend.engine.quant import Int8Linear

    layer_class = {"int8": Int8Linear.quantize, "bf16": Bf16Linear.from_weight}[make]
    layers = [layer_class(torch.randn(n, 128)) for n in (128, 32, 32)]
    x = _bf16_input()
    fused = fuse(layers)
    assert type(fused) is type(layers[0]) and fused.out_features == 192
    torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in layers], dim=-1), rtol=0, atol=1e-5)
    assert fuse([layers[0], Int4Linear.quantize(torch.randn(64, 128))]) is None  # mixed kinds stay apart


def test_mixed_layers_compile_into_the_decode_step(tiny_gguf, tmp_path):
    """A Q4_K_M-like file's decode step (int4 codes beside bfloat16 layers) compiles ahead of time,
    and its logits are the eager step's up to float rounding."""
    import copy

    from backend.engine import compiled
    from backend.engine.gguf_blocks import stored_weights

    path, floats = tiny_gguf
    model = copy.deepcopy(floats)
    quant.quantize_model(model, "int4", stored_weights(str(path), model), prompt_copies=True)
    assert any(isinstance(m, Bf16Linear) for m in model.model.layers.modules())
    assert compiled.attach(model, tmp_path)
    compiled_step = slots.decode_step(model)
    assert not isinstance(compiled_step, slots.DecodeStep)
    ids = [1, 5, 9, 33, 2, 17, 40]
    with torch.inference_mode():
        logits = {}
        for name, step in (("compiled", compiled_step), ("eager", slots.DecodeStep(model))):
            slots.use_decode_step(model, step)
            kv = slots.KV(model, 1)
            slots.forward(model, kv, torch.tensor([ids]), torch.arange(len(ids))[None])
            logits[name] = slots.forward(model, kv, torch.tensor([[7]]), torch.tensor([[len(ids)]]))[0]
    scale = logits["eager"].abs().max()
    assert (logits["compiled"] - logits["eager"]).abs().max() < 0.02 * scale
