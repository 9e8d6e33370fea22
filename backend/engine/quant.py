"""Weight-only quantised linear layers on torch's own CPU kernels.

A decode step of a small model is a string of matrix-vector products, each reading
a whole weight matrix to multiply one or a few rows. Storing the weights as 4-bit
codes in groups of 32 (a scale and a zero point per group) reads 7x fewer bytes
than float32, and torch ships CPU kernels that multiply by them directly:
`_weight_int4pack_mm_for_cpu` (measured here: the 49152 x 576 output layer in
1.6 ms against 10 ms in float32) and `_weight_int8pack_mm` (per-channel int8).
Both want bfloat16 activations (float32 ones made the int4 kernel 20-30x slower),
so the layers cast on the way in and back on the way out.

A GGUF file's Q4_0 / Q4_1 blocks are already this format (32 weights `d * q + m`,
`q` in 0..15), so `Int4Linear.from_codes` packs them as they are; anything else is
quantised here, from its float weights (`Int4Linear.quantize`, `Int8Linear.quantize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

GROUP = 32  # weights per scale and zero point: GGUF's block size, and one of the kernel's group sizes
_PACKED_ROW_BLOCK = 64  # output rows the CPU packing interleaves together
_INNER_K_TILES = 2  # the kernel's packing layout; fixed, since the packed tensors are cached on disk

Quantization = Literal["int4", "int8", "none"]


class Int4Linear(torch.nn.Module):
    """y = x Wᵀ (+ b) with W stored as 4-bit codes q, group-wise `(q - 8) * scale + zero`.

    `halves=2` holds 8-bit codes c = 16 h + l (groups of 32, as GGUF's Q8_0) as two 4-bit
    matrices side by side, [W_h | W_l], and feeds the kernel [x | x]: one call computes
    x W_hᵀ + x W_lᵀ = x Wᵀ exactly. Twice the bytes of 4 bits, and no per-channel int8
    rounding: for the output layer, whose errors go straight into the logits (measured on
    the default model: 4-bit output layer 85 % top-1 agreement with float32, these 8 bits 98 %).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, halves: int = 1):
        super().__init__()
        if in_features % GROUP:
            raise ValueError(f"int4 layers need input features in multiples of {GROUP}, not {in_features}")
        self.in_features, self.out_features, self.halves = in_features, out_features, halves
        # Shapes as the kernel packs them; filled by from_codes / quantize or a cached state dict.
        packed_in = in_features * halves
        self.register_buffer("packed", torch.empty(out_features, packed_in // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(packed_in // GROUP, out_features, 2,
                                                             dtype=torch.bfloat16))
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bias: torch.Tensor | None = None, halves: int = 1) -> Int4Linear:
        """codes [out, in * halves] in 0..15; scale and zero [out, in * halves / 32]:
        weight = (q - 8) * scale + zero, the halves summed."""
        out_features, in_features = codes.shape[0], codes.shape[1] // halves
        layer = cls(in_features, out_features, bias is not None, halves)
        layer.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), _INNER_K_TILES)
        layer.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int4Linear:
        """Asymmetric round-to-nearest per group of 32: each group's range split in 15 steps."""
        out_features, in_features = weight.shape
        groups = weight.float().reshape(out_features, in_features // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
        return cls.from_codes(codes.reshape(out_features, in_features), scale, low + 8 * scale, bias)

    @classmethod
    def quantize_8bit(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int4Linear:
        """Symmetric 8 bits per group of 32 (as Q8_0), held as two 4-bit halves."""
        out_features, in_features = weight.shape
        groups = weight.float().reshape(out_features, in_features // GROUP, GROUP)
        scale = (groups.abs().amax(-1) / 127).clamp(min=1e-8)
        codes = (groups / scale[..., None]).round().clamp(-127, 127).to(torch.int32)
        return cls.from_codes(*split_8bit(codes.reshape(out_features, in_features), scale), bias=bias, halves=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.halves > 1:
            rows = rows.repeat(1, self.halves)
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def split_8bit(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit codes c in -127..127 ([out, in]) with a scale per group of 32 -> 4-bit codes, scales and
    zeros for `Int4Linear(halves=2)`: c + 128 = 16 h + l, so c * s = ((h - 8) * 16 s) + ((l - 8) * s + 8 s)."""
    shifted = codes + 128
    high, low = shifted // 16, shifted % 16
    return (torch.cat([high, low], dim=1), torch.cat([16 * scale, scale], dim=1),
            torch.cat([torch.zeros_like(scale), 8 * scale], dim=1))


class Int8Linear(torch.nn.Module):
    """y = x Wᵀ (+ b) with W stored as int8, one scale per output channel (symmetric)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16))
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None)
        scale = (weight.float().abs().amax(-1) / 127).clamp(min=1e-8)
        layer.weight_int8 = (weight.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        layer.scales = scale.to(torch.bfloat16)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


QUANTISED_LAYERS = {"int4": Int4Linear, "int8": Int8Linear}


@dataclass
class Int4Codes:
    """What `Int4Linear.from_codes` takes: a weight as a file stores it."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    halves: int = 1


def quantize_model(model: torch.nn.Module, quantization: Quantization,
                   stored: dict[str, Int4Codes] | None = None,
                   empty: bool = False) -> None:
    """Replace the model's linear layers, the output layer included, with `quantization`'s.
    With int4, the output layer keeps 8 bits (`Int4Linear` with two halves).

    `stored`: 4-bit codes for some weights, by parameter name, used as they are (from
    `gguf_blocks.int4_weights`); the other layers are quantised from their float weights.
    `empty`: shells to load a cached quantised state dict into. Layers the kernels cannot
    take (input features not a multiple of 32, output features not of 16) stay as they are.
    """
    if quantization == "none":
        return
    layer_class = QUANTISED_LAYERS[quantization]
    # A weight's names: a tied output layer shares the embedding's, which is what a GGUF file stores.
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    stored = stored or {}
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if not isinstance(child, torch.nn.Linear) or child.in_features % GROUP or child.out_features % 16:
                continue
            halves = 2 if quantization == "int4" and child is head else 1
            if empty:
                replacement = layer_class(child.in_features, child.out_features, child.bias is not None,
                                          **({"halves": halves} if halves > 1 else {}))
            elif quantization == "int4" and (codes := next(
                    (stored[n] for n in names.get(id(child.weight), []) if n in stored), None)) \
                    and codes.halves >= halves:
                replacement = Int4Linear.from_codes(codes.codes, codes.scale, codes.zero, child.bias, codes.halves)
            elif halves > 1:
                replacement = Int4Linear.quantize_8bit(child.weight.data, child.bias)
            else:
                replacement = layer_class.quantize(child.weight.data, child.bias)
            setattr(parent, name, replacement)



def fuse(layers: list[torch.nn.Module]) -> torch.nn.Module | None:
    """One layer computing the outputs of `layers` (same input) side by side, or None when they
    cannot be joined. One call instead of several: fewer casts and less Python per step."""
    if any(layer.bias is not None for layer in layers):
        return None
    if all(isinstance(layer, Int4Linear) and layer.halves == layers[0].halves
           and layer.out_features % _PACKED_ROW_BLOCK == 0 for layer in layers):
        fused = Int4Linear(layers[0].in_features, sum(layer.out_features for layer in layers),
                           halves=layers[0].halves)
        # The kernel packs output rows in blocks of 64, so whole blocks concatenate (checked:
        # tests/test_quant.py; layers of other sizes stay apart).
        fused.packed = torch.cat([layer.packed for layer in layers])
        fused.scales_and_zeros = torch.cat([layer.scales_and_zeros for layer in layers], dim=1)
        return fused
    if all(isinstance(layer, torch.nn.Linear) for layer in layers):
        fused = torch.nn.Linear(layers[0].in_features, sum(layer.out_features for layer in layers), bias=False)
        fused.weight = torch.nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
        return fused
    return None
