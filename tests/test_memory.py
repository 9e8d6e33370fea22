"""What the engine holds in memory: the converted copy stores what the engine reads (no bfloat16
prompt copies by default, a Q8_0 embedding as its codes, a tied output layer once), the compiled
step runs on the model's own tensors, and layers joined for the slot path share their weights."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from backend.config import DeployConfig
from backend.engine import compiled, slots
from backend.engine.gguf_blocks import q8_0_embedding
from backend.engine.loading import load
from backend.engine.location import converted_cache, locate
from backend.engine.quant import GROUP, Int4Linear, Q8Embedding, fuse
from backend.settings import ModelSettings


def _q8_0_blocks(rows: int, width: int, seed: int = 0) -> np.ndarray:
    """Random Q8_0 rows as a GGUF file stores them: per 32 values an fp16 scale, then 32 int8 codes."""
    rng = np.random.default_rng(seed)
    scales = (rng.random((rows, width // GROUP, 1)) * 0.02).astype(np.float16)
    codes = rng.integers(-127, 128, (rows, width // GROUP, GROUP), dtype=np.int8)
    return np.concatenate([scales.view(np.uint8), codes.view(np.uint8)], axis=-1).reshape(rows, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_0_embedding_gives_the_float_rows_bitwise(dtype):
    """The same numbers as gguf-py's de-quantisation (what transformers loads a GGUF file with),
    the rows looked up and the tied output layer made from them, with and without a family scale."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, width = 300, 96
    blocks = _q8_0_blocks(rows, width)
    floats = torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q8_0)).to(dtype)  # [rows, width]
    per_block = blocks.reshape(rows, -1, 2 + GROUP)
    for scale in (None, torch.tensor(width ** 0.5)):
        embedding = Q8Embedding(rows, width, dtype, scale)
        embedding.scales = torch.from_numpy(per_block[..., :2].copy().view(np.float16)[..., 0])
        embedding.codes = torch.from_numpy(per_block[..., 2:].copy().view(np.int8).reshape(rows, -1))
        ids = torch.tensor([[0, 7, 299], [5, 5, 123]])
        expected = floats[ids] if scale is None else floats[ids] * scale.to(dtype)
        assert torch.equal(embedding(ids), expected)
        assert embedding.equals(floats)
        head = embedding.tied_head(rows_at_once=64)  # in several pieces
        assert torch.equal(head.weight, floats.to(torch.bfloat16))
        assert "weight" not in head.state_dict()  # not saved: made from the embedding at load


def _default_settings(**changes) -> ModelSettings:
    settings = DeployConfig.read().textbot().default.model_settings()
    return settings.model_copy(update=changes)


def test_default_models_converted_copy_holds_what_the_engine_reads():
    """No bfloat16 prompt copies (model.prompt_weights defaults to int4; deploy.yaml asks for them),
    the Q8_0 embedding as int8 codes and fp16 scales, and no second copy of the output layer tied to it."""
    assert ModelSettings().prompt_weights == "int4"
    settings = _default_settings(prompt_weights="int4", compile=False)
    loaded = load(settings)
    folder = converted_cache(settings, locate(settings))
    with safe_open(str(folder / "model.safetensors"), "pt") as saved:
        names = list(saved.keys())
        dtypes = {name: saved.get_slice(name).get_dtype() for name in names}
    assert not [name for name in names if ".dense." in name]
    assert "lm_head.weight" not in names
    assert dtypes["model.embed_tokens.codes"] == "I8" and dtypes["model.embed_tokens.scales"] == "F16"
    assert not [name for name, dtype in dtypes.items() if dtype == "BF16" and "scales_and_zeros" not in name]
    model = loaded.model
    assert isinstance(model.get_input_embeddings(), Q8Embedding)
    # The output layer is there all the same, made from the embedding: its rows are the embedding's.
    head = model.get_output_embeddings()
    ids = torch.tensor([0, 1, 4096, 49151])
    hidden = torch.eye(576)[:3]
    with torch.inference_mode():
        logits = head(hidden)  # column j of the logits of the unit vector i is weight[j, i]
        rows = model.get_input_embeddings()(ids)
    assert torch.equal(logits[:, ids].T, rows[:, :3].to(torch.bfloat16).float())
    # A different prompt_weights is a converted copy of its own.
    assert converted_cache(_default_settings(prompt_weights="bfloat16"), locate(settings)) != folder


def test_default_models_q8_0_embedding_is_bitwise_transformers_float_one():
    """On the shipped file: the codes and scales give exactly the float embedding transformers
    de-quantises it to (`q8_0_embedding` returns None otherwise), so the logits do not move."""
    from transformers import AutoModelForCausalLM

    location = locate(_default_settings())
    model = AutoModelForCausalLM.from_pretrained(location.path, gguf_file=location.gguf_file, dtype=torch.float32)
    embedding = q8_0_embedding(f"{location.path}/{location.gguf_file}", model)
    assert embedding is not None
    assert embedding.codes.dtype == torch.int8 and embedding.codes.shape == model.get_input_embeddings().weight.shape


def test_compiled_step_runs_on_the_models_own_tensors():
    """The package holds the code, not the weights: small on disk, and what it multiplies by is
    the model's own memory (the same pointers), not a copy."""
    settings = _default_settings()
    assert settings.compile
    loaded = load(settings)
    assert loaded.compiled
    model = loaded.model
    package = compiled.package_path(converted_cache(settings, locate(settings)))
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert package.stat().st_size < weights / 8, (package.stat().st_size, weights)
    step = slots.decode_step(model)
    own = {**dict(slots.DecodeStep(model).named_parameters()), **dict(slots.DecodeStep(model).named_buffers())}
    shared = [name for name, tensor in step._constants.items() if name in own]
    assert len(shared) > len(step._constants) // 2
    assert all(step._constants[name].data_ptr() == own[name].data_ptr() for name in shared)


def test_fused_layers_hold_their_weights_once():
    """The layers joined by `fuse` read their weights from the fused layer's tensors, and still
    give bitwise what they gave before (their scales are a strided view: see Int4Linear.forward)."""
    torch.manual_seed(0)
    layers = [Int4Linear.quantize(torch.randn(n, 128)) for n in (128, 64, 64)]
    x = torch.randn(3, 128).to(torch.bfloat16).float()
    before = [layer(x) for layer in layers]
    fused = fuse(layers)
    for layer, expected in zip(layers, before):
        assert layer.packed.untyped_storage().data_ptr() == fused.packed.untyped_storage().data_ptr()
        assert layer.scales_and_zeros.untyped_storage().data_ptr() == fused.scales_and_zeros.untyped_storage().data_ptr()
        assert torch.equal(layer(x), expected)


def test_the_engine_process_runs_with_the_allocator_settings(tiny_models):
    """`_engine_process` (replicas' engines and the warm engine alike) sets glibc's malloc as measured
    (backend/engine/process.py, ENGINE_ALLOCATOR_ENV); a value the environment already has wins.
    Asked of the engine process itself: some sandboxes show an empty /proc/PID/environ."""
    import asyncio
    import os

    from backend.engine.process import ENGINE_ALLOCATOR_ENV, EngineProcess
    from backend.settings import EngineSettings

    engine = EngineProcess(ModelSettings(source=str(tiny_models["tiny-chat"])), EngineSettings(), 1)
    try:
        allocator = asyncio.run(engine.stats())["allocator"]
    finally:
        engine.shutdown()
    assert ENGINE_ALLOCATOR_ENV
    assert allocator == {name: os.environ.get(name, value) for name, value in ENGINE_ALLOCATOR_ENV.items()}
