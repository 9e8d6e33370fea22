"""A GGUF file's 4-bit weights as they are stored, for `Int4Linear.from_codes`.

transformers de-quantises a GGUF file to float weights; re-quantising those would
round a second time. Q4_0 and Q4_1 blocks are already torch's int4 format (32
codes `q` in 0..15 sharing a scale `d` and, for Q4_1, an offset `m`), so their
codes go to the kernel untouched: weight = d * q + m = (q - 8) * d + (m + 8 d).
Other block types (the default model's Q8_0 embedding, tied to its output layer, among
them) are left to transformers' float weights.
"""

from __future__ import annotations

import numpy as np
import torch

from backend.engine.quant import Int4Codes

# Block layouts, as llama.cpp writes them: float16 d [, float16 m], then 16 bytes of
# codes, element j in the low nibble of byte j and element j + 16 in its high nibble.
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}


def int4_weights(gguf_path: str, model: torch.nn.Module) -> dict[str, Int4Codes]:
    """{parameter name in `model`: its codes} for each Q4_0 and Q4_1 tensor of the file."""
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
    found = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in _BLOCK_BYTES or tensor.name not in names:
            continue
        blocks = processor.process(weights=np.asarray(tensor.data), name=tensor.name).weights
        found[names[tensor.name]] = _codes(blocks, kind)
    return found


def _codes(raw: np.ndarray, kind: str) -> Int4Codes:
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, _BLOCK_BYTES[kind])
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == "Q4_1":
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        zero = m + 8 * d
    else:  # Q4_0: weight = (q - 8) * d
        zero = torch.zeros_like(d)
    nibbles = blocks[..., -16:]
    codes = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1).reshape(rows, -1)
    return Int4Codes(torch.from_numpy(codes.astype(np.int32)), d, zero)
