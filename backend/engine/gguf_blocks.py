"""How each weight of a GGUF file goes to torch's kernels in an int4 model, and the 4-bit
weights that go as they are stored.

transformers de-quantises a GGUF file to float weights; re-quantising those to 4 bits
would round a second time. Three block types are already torch's int4 format (32 codes
`q` in 0..15 sharing a scale and a zero point), so their codes go to the kernel untouched:

- Q4_0: weight = d * (q - 8)                    -> scale d, zero 0
- Q4_1: weight = d * q + m                      -> scale d, zero m + 8 d
- Q4_K: super-blocks of 256 weights, 8 sub-blocks of 32, each with a 6-bit scale `sc`
  and a 6-bit min `m` under the fp16 `d` and `dmin`: weight = d sc q - dmin m
                                                -> scale d sc, zero 8 d sc - dmin m

The other types hold 5 to 8 bits a weight (or 16 and 32); `LAYOUTS` says which layer each
becomes, chosen by measurement on Gemma 3 270M Q4_K_M (docs/benchmarks/gguf-types.md):
rounding their float weights to 4 bits again cost much quality, to int8 per output channel
too much for a whole model; bfloat16 kept it. A type not named there (F16, BF16, F32, the IQ and other K types) is quantised
as `model.quantization` says, from transformers' float weights.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from backend.engine.quant import GROUP, Int4Codes, Layout, Q8Embedding

log = logging.getLogger(__name__)

# Block layouts, as llama.cpp writes them (bytes a block; weights a block: 32, or 256 for Q4_K).
#   Q4_0: fp16 d, 16 bytes of codes; Q4_1: fp16 d, fp16 m, 16 bytes of codes. Element j of a
#   block is the low nibble of code byte j, element j + 16 its high nibble.
#   Q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of codes: four runs of
#   32 bytes, run r holding sub-block 2r in its low nibbles and sub-block 2r + 1 in its high ones.
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}

# The layer each GGUF type becomes in an int4 model: "codes" the file's own 4-bit codes;
# otherwise a layer made from the de-quantised float weights (quant.Layout). Measured on Gemma 3
# 270M Q4_K_M against the file's float weights (docs/benchmarks/gguf-types.md): 4 bits again lost
# 8-22 points of top-1 agreement on each type's layers alone. int8 per channel lost 1.5-3.5
# (Q5_0, 81 of the 126 layers, fell under 97 % alone and was no faster than bfloat16 at one row);
# with Q6_K and Q8_0 in int8 the whole model agreed on 96.8 %, in bfloat16 on 97.7 % (the
# bfloat16 output layer already costs about 2.5 points), and int8 saved some 2 ms a step at one
# row only. So bfloat16: near the file's weights and, at 8 rows, the fastest. Q5_1 and Q5_K (not
# in that file) go the same way.
LAYOUTS: dict[str, Layout | str] = {
    "Q4_0": "codes", "Q4_1": "codes", "Q4_K": "codes",
    "Q5_0": "bf16", "Q5_1": "bf16", "Q5_K": "bf16", "Q6_K": "bf16", "Q8_0": "bf16",
}


def stored_weights(gguf_path: str, model: torch.nn.Module,
                   layouts: dict[str, Layout | str] | None = None) -> dict[str, Int4Codes | Layout]:
    """{parameter name in `model`: its 4-bit codes, or the layout to quantise it to}, for each
    tensor of the file whose type `layouts` (default `LAYOUTS`) names; for `quant.quantize_model`."""
    layouts = LAYOUTS if layouts is None else layouts
    found: dict[str, Int4Codes | Layout] = {}
    for name, kind, raw in _tensors(gguf_path, model):
        layout = layouts.get(kind)
        if layout == "codes" and kind in _BLOCK_BYTES:
            found[name] = int4_codes(raw(), kind)
        elif layout in ("int4", "int8", "bf16"):
            found[name] = layout
    return found


def q8_0_embedding(gguf_path: str, model: torch.nn.Module) -> Q8Embedding | None:
    """The model's input embedding as the file stores it, when that is Q8_0 (blocks of an fp16 scale
    `d` and 32 int8 codes, weight = d * q): its codes and scales as they are. None for another type,
    or if its rows are not bitwise the float embedding transformers made of them (checked here)."""
    embedding = model.get_input_embeddings()
    wanted = {name for name, parameter in model.named_parameters(remove_duplicate=False)
              if parameter is embedding.weight}
    for name, kind, raw in _tensors(gguf_path, model):
        if name not in wanted:
            continue
        if kind != "Q8_0":
            return None
        rows = raw()
        blocks = rows.reshape(rows.shape[0], -1, 2 + GROUP)
        q8 = Q8Embedding.of(embedding)
        q8.scales = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])
        q8.codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(rows.shape[0], -1))
        if not q8.equals(embedding.weight.data):
            log.warning("The Q8_0 embedding of %s does not give the float rows; kept in float", gguf_path)
            return None
        return q8
    return None


def tensor_types(gguf_path: str, model: torch.nn.Module) -> dict[str, str]:
    """{parameter name in `model`: the GGUF type its tensor is stored as}."""
    return {name: kind for name, kind, _ in _tensors(gguf_path, model)}


def _tensors(gguf_path: str, model: torch.nn.Module):
    """(parameter name, GGUF type name, a function giving its raw rows of blocks) for each
    tensor of the file that is a parameter of `model`."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map)

    reader = gguf.GGUFReader(gguf_path)
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode()
    # The processor undoes what llama.cpp's converter did to some tensors (it permutes the
    # rows of Llama's q and k projections); rows hold whole blocks, so the blocks move as they are.
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    for tensor in reader.tensors:
        if tensor.name in names:
            def raw(tensor=tensor):
                return processor.process(weights=np.asarray(tensor.data), name=tensor.name).weights
            yield names[tensor.name], tensor.tensor_type.name, raw


def int4_codes(raw: np.ndarray, kind: str) -> Int4Codes:
    """A Q4_0, Q4_1 or Q4_K tensor's rows of blocks (uint8, [rows, bytes]) as codes [rows, weights]
    in 0..15 and a scale and zero point per 32 weights: weight = (q - 8) * scale + zero. Float32,
    or for Q4_K float64, in which (q - 8) * scale + zero is exact (the kernel rounds both to bfloat16)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, _BLOCK_BYTES[kind])
    if kind == "Q4_K":
        return _q4_k(blocks)
    d = _fp16(blocks, 0)
    zero = _fp16(blocks, 2) + 8 * d if kind == "Q4_1" else torch.zeros_like(d)  # Q4_0: weight = (q - 8) d
    return Int4Codes(torch.from_numpy(_nibbles(blocks[..., -16:]).reshape(rows, -1)), d, zero)


def _q4_k(blocks: np.ndarray) -> Int4Codes:
    rows, supers = blocks.shape[:2]
    # float64, so the products and the sum are exact: d sc (11 + 6 bits) times a 4-bit code, less
    # dmin m, rounded once to float32 gives what the file's own de-quantisation does.
    d, dmin = _fp16(blocks, 0).double(), _fp16(blocks, 2).double()
    sc, m = _q4_k_scales_and_mins(blocks[..., 4:16])
    scale = d[..., None] * sc  # [rows, supers, 8]
    zero = 8 * scale - dmin[..., None] * m
    # Each run of 32 code bytes: sub-block 2r in the low nibbles, 2r + 1 in the high ones.
    runs = blocks[..., 16:].reshape(rows, supers, 4, 32)
    codes = np.stack([runs & 0xF, runs >> 4], axis=3)  # [rows, supers, run, nibble, 32]
    return Int4Codes(torch.from_numpy(codes.reshape(rows, -1).astype(np.int32)),
                     scale.reshape(rows, -1), zero.reshape(rows, -1))


def _q4_k_scales_and_mins(packed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and 8 six-bit mins of each super-block, from its 12 bytes.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3. Bytes 8-11 hold the
    low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble); the top 2 bits of
    scales 4-7 and mins 4-7 are the spare top bits of bytes 0-3 and 4-7."""
    packed = packed.astype(np.int64)
    low_scales, low_mins, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([low_scales & 63, (rest & 0xF) | (low_scales >> 6) << 4], axis=-1)
    mins = np.concatenate([low_mins & 63, (rest >> 4) | (low_mins >> 6) << 4], axis=-1)
    return torch.from_numpy(scales).double(), torch.from_numpy(mins).double()


def _fp16(blocks: np.ndarray, offset: int) -> torch.Tensor:
    """The float16 at byte `offset` of each block, as float32."""
    return torch.from_numpy(blocks[..., offset:offset + 2].copy().view(np.float16)[..., 0].astype(np.float32))


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """16 bytes a block -> 32 codes: the low nibbles, then the high ones."""
    return np.concatenate([packed & 0xF, packed >> 4], axis=-1).astype(np.int32)
