"""Weight-only quantised linear layers on torch's own CPU kernels.

A decode step of a small model is a string of matrix-vector products, each reading
a whole weight matrix to multiply one or a few rows. Storing the weights as 4-bit
codes in groups of 32 (a scale and a zero point per group) reads 7x fewer bytes
than float32, and torch ships CPU kernels that multiply by them directly:
`_weight_int4pack_mm_for_cpu` (measured here: the 49152 x 576 output layer in
1.6 ms against 10 ms in float32) and `_weight_int8pack_mm` (per-channel int8).
Both want bfloat16 activations (float32 ones made the int4 kernel 20-30x slower),
so the layers cast on the way in and back on the way out.

The output layer of an int4 model is the exception: it stays in bfloat16 (`Bf16Linear`),
laid out once for oneDNN's matmul, which reads it at memory speed for any number of rows
while the int4 kernel's time grows with them.

A GGUF file's Q4_0 / Q4_1 / Q4_K blocks are already this format (32 weights `d * q + m`,
`q` in 0..15), so `Int4Linear.from_codes` packs them as they are; anything else is
quantised here, from its float weights (`Int4Linear.quantize`, `Int8Linear.quantize`).
In an int4 model, a GGUF file's 5- to 8-bit weights go to `Bf16Linear` (gguf_blocks.LAYOUTS,
measured in docs/benchmarks/gguf-types.md): 4 bits again cost much quality, 8 bits per channel
too much for a whole model. `quantize_model` can give a layer any of the three (`Layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

GROUP = 32  # weights per scale and zero point: GGUF's block size, and one of the kernel's group sizes
_PACKED_ROW_BLOCK = 64  # output rows the CPU packing interleaves together
_INNER_K_TILES = 2  # the kernel's packing layout; fixed, since the packed tensors are cached on disk

Quantization = Literal["int4", "int8", "none"]


class Int4Linear(torch.nn.Module):
    """y = x Wᵀ (+ b) with W stored as 4-bit codes q, group-wise `(q - 8) * scale + zero`.

    `dense`, when there is one (`model.prompt_weights: bfloat16`), holds the same weights in
    bfloat16 for reading prompts (`slots.forward` calls it for several positions a row, the 4-bit
    codes for one). The int4 kernel's time grows with the rows while oneDNN's bfloat16 matmul
    reads its weights once: measured over the default model's 30 layers, one thread, on an Intel
    Xeon with AMX 64 rows 164 against 33 ms, 512 rows 1371 against 114, at 8 rows both about 25
    ms; on an AMD EPYC with AVX-512 BF16 (no AMX) 64 rows 204 against 112 ms, 256 rows 808
    against 417. Off by default: the copies are 4x the int4 weights (202 MB for the default model).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dense: bool = False):
        super().__init__()
        if in_features % GROUP:
            raise ValueError(f"int4 layers need input features in multiples of {GROUP}, not {in_features}")
        self.in_features, self.out_features = in_features, out_features
        # Shapes as the kernel packs them; filled by from_codes / quantize or a cached state dict.
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // GROUP, out_features, 2,
                                                             dtype=torch.bfloat16))
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.dense = Bf16Linear(in_features, out_features, bias) if dense else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bias: torch.Tensor | None = None, dense: bool = False) -> Int4Linear:
        """codes [out, in] in 0..15; scale and zero [out, in / 32]: weight = (q - 8) * scale + zero.
        `dense`: keep those weights in bfloat16 too, for prompts."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bias is not None)
        layer.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), _INNER_K_TILES)
        layer.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        if bias is not None:
            layer.bias.data.copy_(bias)
        if dense:
            # The weights as the kernel computes them (its scale and zero are bfloat16), rounded to bfloat16.
            scale, zero = (t.to(torch.bfloat16).float()[..., None] for t in (scale, zero))
            groups = (codes.float().reshape(out_features, -1, GROUP) - 8) * scale + zero
            layer.dense = Bf16Linear.from_weight(groups.reshape(out_features, in_features), bias)
        return layer

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dense: bool = False) -> Int4Linear:
        """Asymmetric round-to-nearest per group of 32: each group's range split in 15 steps."""
        out_features, in_features = weight.shape
        groups = weight.float().reshape(out_features, in_features // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
        return cls.from_codes(codes.reshape(out_features, in_features), scale, low + 8 * scale, bias, dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        # Contiguous, or the kernel computes wrong numbers without a word (tried, torch 2.13): a layer
        # joined into a fused one reads its scales as a strided view of the fused layer's (`fuse`).
        scales = self.scales_and_zeros.contiguous()
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(torch.nn.Module):
    """y = x Wᵀ (+ b) with W stored as int8, one scale per output channel (symmetric)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16))
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_load_state_dict_post_hook(_aligned_int8_weights)

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


def _aligned_int8_weights(layer: Int8Linear, _incompatible_keys) -> None:
    """Copy loaded tensors that do not start on a 64-byte boundary to ones that do.

    `_weight_int8pack_mm` crashed (a segmentation fault, torch 2.13, AVX-512) at 4 rows or more
    on weights a few bytes off the boundary, which is where safetensors' `load_file` leaves a
    converted copy's tensors (`assign=True` keeps them in place); torch's own allocations are aligned.
    """
    for name in ("weight_int8", "scales"):
        if getattr(layer, name).data_ptr() % 64:
            setattr(layer, name, getattr(layer, name).clone())


class Bf16Linear(torch.nn.Module):
    """y = x Wᵀ (+ b) with W in bfloat16: an int4 model's output layer.

    The output layer is the largest matrix of a small model (49152 x 576 in the default one),
    and every row of every step goes through it. Measured (one thread, 2026-12-02, an Intel
    Xeon with AMX): as 8-bit codes in two int4 halves it took 3.1 ms for 1 row, 11.9 ms for 8
    and 93 ms for 64; in bfloat16, laid out for oneDNN, 2.4-2.7 ms for 1 to 8 rows and 4 ms
    for 64. The weights are read once whatever the rows, so a batch costs about what one row does.

    For the output layer's shape a row's logits did not depend on the other rows of the call
    (bitwise, 1 to 40 rows, with oneDNN's AMX, AVX-512 bf16 and AVX-512 kernels; tested), so
    a greedy reply is the same alone and in a decode batch. That does not hold for every
    shape (576 x 1536 at 8 rows differed in the last bit): the bfloat16 copies of the other
    layers read prompts only, and decode steps keep the int4 kernel, which is row-invariant.
    Except a GGUF file's 5- to 8-bit layers, which decode in bfloat16 too (gguf_blocks.LAYOUTS):
    on an AMD EPYC with AVX-512 BF16 and no AMX, 1 against 8 rows was bitwise the same for
    Gemma 3 270M's shapes and for 576 x 1536 (2026-12); with AMX such a layer may move a
    greedy reply's last bits with its batch.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, saved: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # `saved` False: not in the state dict (an output layer tied to a Q8_0 embedding, built from it at load).
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.bfloat16), persistent=saved)
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # oneDNN's blocked copy of `weight`, made at the first call (after a saved state is loaded
        # into `weight`), which then lets the plain copy go: a converted model is saved before
        # its first call, and the packed tensor is opaque (it cannot be saved).
        self._packed: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, saved: bool = True) -> Bf16Linear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, saved)
        layer.weight = weight.detach().to(torch.bfloat16).contiguous()
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def pack(self) -> None:
        """Lay the weights out for oneDNN now (the first call does it otherwise); on a CPU
        without bfloat16 dot products, widen them to float32 instead."""
        if self._packed is None:
            self._packed = (torch.ops.mkldnn._reorder_linear_weight(self.weight) if ONEDNN_BF16
                            else self.weight.float())
            self.weight = torch.empty(0, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            # Traced for the compiled decode step (a GGUF file's 5- to 8-bit layers decode in bfloat16):
            # oneDNN's packed tensor is opaque to torch.export, so the plain matmul is traced, and the
            # compiler lays it out for oneDNN itself. Only a layer not yet packed has its plain weights:
            # the decode step's fused layers are new ones (slots._fused_layers).
            if self._packed is not None:
                raise RuntimeError("a bfloat16 layer laid out for oneDNN cannot be traced; trace it before its first call")
            y = F.linear(rows.to(torch.bfloat16), self.weight).to(x.dtype)
            return (y if self.bias is None else y + self.bias.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)
        self.pack()
        if ONEDNN_BF16:
            y = torch.ops.mkldnn._linear_pointwise(rows.to(torch.bfloat16), self._packed, None, "none", [], "")
        else:  # W·xᵀ in float32, as loading.VocabProjection (not bitwise the same for 1 and 8 rows)
            y = (self._packed @ rows.float().T).T
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


# oneDNN's bfloat16 matmul, where the CPU has bfloat16 dot products (AVX-512 BF16 or AMX).
# Without them oneDNN emulates bfloat16, and a row's result came to depend on the other rows
# of the call (AVX-512 without BF16, tried by limiting oneDNN with ONEDNN_MAX_CPU_ISA).
ONEDNN_BF16 = torch.backends.mkldnn.is_available() and (torch.cpu._is_avx512_bf16_supported()
                                                        or torch.cpu._is_amx_tile_supported())

QUANTISED_LAYERS = {"int4": Int4Linear, "int8": Int8Linear}


class Q8Embedding(torch.nn.Module):
    """An embedding kept as a GGUF file's Q8_0 blocks store it: int8 codes, one float16 scale per
    32 of them (`d * q`); each looked-up row is widened as it is read.

    The same numbers as the float embedding transformers de-quantises the file to: a float16
    scale (11 significant bits) times an int8 code (8) is exact in float32, so the rows are
    bitwise those (tested), and so is an output layer built from it (`tied_head`). A quarter
    of the memory: the default model's 49152 x 576 embedding 28 MB instead of 108, Gemma 3
    270M's 262144 x 640 about 170 MB instead of 671. Only the rows a step reads are touched.

    `scale` is what the family multiplies embeddings by (Gemma's square root of the width,
    `embed_scale`), applied as its own embedding module does: in the output dtype.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype,
                 scale: torch.Tensor | None = None):
        super().__init__()
        if embedding_dim % GROUP:
            raise ValueError(f"Q8_0 rows hold blocks of {GROUP}, not {embedding_dim} values")
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.register_buffer("codes", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(num_embeddings, embedding_dim // GROUP, dtype=torch.float16))
        self.register_buffer("embed_scale", None if scale is None else scale.detach().clone(), persistent=False)

    @classmethod
    def of(cls, embedding: torch.nn.Embedding) -> Q8Embedding:
        """An empty one in place of `embedding` (its shape, dtype and family scale), to be filled."""
        scale = getattr(embedding, "embed_scale", None)
        return cls(embedding.num_embeddings, embedding.embedding_dim, embedding.weight.dtype,
                   scale if isinstance(scale, torch.Tensor) else None)

    @property
    def weight(self) -> torch.Tensor:
        """No rows: only the embedding's dtype, which code written for `torch.nn.Embedding` reads off
        `weight` (the KV cache's dtype, the rotary tables' sample); `rows` gives the values."""
        return torch.empty(0, self.embedding_dim, dtype=self.dtype)

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start..stop de-quantised, as the float embedding holds them (before the family's scale)."""
        return self._widen(self.codes[start:stop], self.scales[start:stop])

    def _widen(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        blocks = codes.reshape(*codes.shape[:-1], -1, GROUP).float() * scales.float()[..., None]
        return blocks.reshape(*codes.shape).to(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._widen(self.codes[ids], self.scales[ids])
        return rows if self.embed_scale is None else rows * self.embed_scale.to(self.dtype)

    def tied_head(self, bias: torch.Tensor | None = None, rows_at_once: int = 4096) -> Bf16Linear:
        """The output layer that shares these weights, in bfloat16 (an int4 model's output layer):
        built a few rows at a time, so the float rows never all exist at once."""
        weight = torch.empty(self.num_embeddings, self.embedding_dim, dtype=torch.bfloat16)
        for start in range(0, self.num_embeddings, rows_at_once):
            weight[start:start + rows_at_once] = self.rows(start, start + rows_at_once)
        return Bf16Linear.from_weight(weight, bias, saved=False)

    def equals(self, weight: torch.Tensor, rows_at_once: int = 4096) -> bool:
        """Whether these rows are bitwise `weight` (a float embedding's), compared a few rows at a time."""
        return weight.shape == self.codes.shape and all(
            torch.equal(self.rows(start, start + rows_at_once), weight[start:start + rows_at_once])
            for start in range(0, self.num_embeddings, rows_at_once))


# The model config's record that an int4 model's embedding is a Q8Embedding (saved with a converted
# copy, as LAYER_LAYOUTS), so its empty shell is one, and a tied output layer is built from it at load.
Q8_EMBEDDING = "textbot_q8_0_embedding"


def use_q8_embedding(model: torch.nn.Module, embedding: Q8Embedding, empty: bool = False) -> None:
    """Put `embedding` in place of the model's input embedding. An output layer tied to it becomes
    one made from it, and not saved: the same weights are stored once. `empty`: `embedding` is a shell
    to load a converted copy into, and so is the output layer (`tie_to_q8_embedding` fills it)."""
    model.set_input_embeddings(embedding)
    setattr(model.config, Q8_EMBEDDING, True)
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        model.set_output_embeddings(
            Bf16Linear(head.in_features, head.out_features, head.bias is not None, saved=False) if empty
            else embedding.tied_head(head.bias))


def tie_to_q8_embedding(model: torch.nn.Module) -> None:
    """Once a converted copy is loaded: a tied output layer's weights, from the Q8_0 embedding."""
    head = model.get_output_embeddings()
    if isinstance(head, Bf16Linear) and "weight" in head._non_persistent_buffers_set:
        model.set_output_embeddings(model.get_input_embeddings().tied_head(head.bias))


@dataclass
class Int4Codes:
    """What `Int4Linear.from_codes` takes: a weight as a file stores it."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


# A layer of an int4 model other than the file's own codes: its float weights quantised to
# 4 bits (`Int4Linear.quantize`), to 8 bits per output channel (`Int8Linear`), or kept in bfloat16.
Layout = Literal["int4", "int8", "bf16"]

# The model config's record of the layers of an int4 model that are not Int4Linear ({module
# name: layout}): saved with a converted copy (config.json), so its empty shells are built alike.
LAYER_LAYOUTS = "textbot_layer_layouts"


def quantize_model(model: torch.nn.Module, quantization: Quantization,
                   stored: dict[str, Int4Codes | Layout] | None = None,
                   empty: bool = False, prompt_copies: bool = False) -> None:
    """Replace the model's linear layers, the output layer included, with `quantization`'s.
    With int4, the output layer goes to bfloat16 (`Bf16Linear`).

    `stored` (int4 only, from `gguf_blocks.stored_weights`), by parameter name: 4-bit codes
    used as they are, or the layout a weight takes instead of int4; the other layers are
    quantised to int4 from their float weights. `empty`: shells to load a cached quantised
    state dict into (each of the layout the model config records). Layers the kernels cannot
    take (input features not a multiple of 32, output features not of 16) stay as they are.
    `prompt_copies`: int4 layers also keep their weights in bfloat16, for reading prompts
    (`Int4Linear.dense`; only the slot path uses them).
    """
    if quantization == "none":
        return
    layer_class = QUANTISED_LAYERS[quantization]
    # A weight's names: a tied output layer shares the embedding's, which is what a GGUF file stores.
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    stored = stored or {}
    recorded = (getattr(model.config, LAYER_LAYOUTS, None) or {}) if empty else {}
    head = model.get_output_embeddings()
    for parent_name, parent in list(model.named_modules()):
        for name, child in parent.named_children():
            if not isinstance(child, torch.nn.Linear) or child.in_features % GROUP or child.out_features % 16:
                continue
            if quantization == "int4" and child is head:
                replacement = (Bf16Linear(child.in_features, child.out_features, child.bias is not None) if empty
                               else Bf16Linear.from_weight(child.weight.data, child.bias))
            elif quantization == "int4":
                module_name = f"{parent_name}.{name}" if parent_name else name
                if empty:
                    replacement = _empty_int4_model_layer(child, recorded.get(module_name, "int4"), prompt_copies)
                else:
                    weight = next((stored[n] for n in names.get(id(child.weight), []) if n in stored), "int4")
                    replacement = int4_model_layer(child, weight, prompt_copies)
                    if weight in ("int8", "bf16"):
                        recorded[module_name] = weight
            elif empty:
                replacement = layer_class(child.in_features, child.out_features, child.bias is not None)
            else:
                replacement = layer_class.quantize(child.weight.data, child.bias)
            setattr(parent, name, replacement)
    if recorded and not empty:
        setattr(model.config, LAYER_LAYOUTS, recorded)


def int4_model_layer(linear: torch.nn.Linear, weight: Int4Codes | Layout,
                      prompt_copies: bool) -> torch.nn.Module:
    """An int4 model's layer for `linear`: from a file's codes, or its float weights in `weight`'s layout."""
    if isinstance(weight, Int4Codes):
        return Int4Linear.from_codes(weight.codes, weight.scale, weight.zero, linear.bias, prompt_copies)
    if weight == "int8":
        return Int8Linear.quantize(linear.weight.data, linear.bias)
    if weight == "bf16":
        return Bf16Linear.from_weight(linear.weight.data, linear.bias)
    return Int4Linear.quantize(linear.weight.data, linear.bias, prompt_copies)


def _empty_int4_model_layer(linear: torch.nn.Linear, layout: Layout, prompt_copies: bool) -> torch.nn.Module:
    shape = (linear.in_features, linear.out_features, linear.bias is not None)
    if layout == "int8":
        return Int8Linear(*shape)
    if layout == "bf16":
        return Bf16Linear(*shape)
    return Int4Linear(*shape, dense=prompt_copies)


def fuse(layers: list[torch.nn.Module]) -> torch.nn.Module | None:
    """One layer computing the outputs of `layers` (same input) side by side, or None when they
    cannot be joined. One call instead of several: fewer casts and less Python per step."""
    # Biases side by side too (Qwen2's q, k and v have them); a layer without one adds zeros.
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features)
                          for layer in layers])
    if all(isinstance(layer, Int4Linear) and layer.out_features % _PACKED_ROW_BLOCK == 0 for layer in layers):
        fused = Int4Linear(layers[0].in_features, sum(layer.out_features for layer in layers), bias is not None)
        if bias is not None:
            fused.bias.data.copy_(bias)
        # The kernel packs output rows in blocks of 64, so whole blocks concatenate (checked:
        # tests/test_quant.py; layers of other sizes stay apart).
        fused.packed = torch.cat([layer.packed for layer in layers])
        fused.scales_and_zeros = torch.cat([layer.scales_and_zeros for layer in layers], dim=1)
        # The layers then read their weights from the fused layer's tensors, so they are held once:
        # kept apart, q, k, v, gate and up were two thirds of the default model's int4 weights held
        # twice (41 MB). Only the generic path (transformers' forward) still calls the layers themselves.
        start = 0
        for layer in layers:
            stop = start + layer.out_features
            layer.packed, layer.scales_and_zeros = fused.packed[start:stop], fused.scales_and_zeros[:, start:stop]
            start = stop
        if ONEDNN_BF16 and all(layer.dense is not None for layer in layers):
            # Moved, not copied: only the fused layer reads prompts (the originals' own forward is int4).
            # Not on a CPU without bfloat16 dot products, where prompts stay on int4 (slots._for_prompts).
            fused.dense = Bf16Linear.from_weight(torch.cat([layer.dense.weight for layer in layers]), bias)
            for layer in layers:
                layer.dense = None
        return fused
    if all(isinstance(layer, Int8Linear) for layer in layers):  # one scale per output row: rows concatenate
        fused = Int8Linear(layers[0].in_features, sum(layer.out_features for layer in layers), bias is not None)
        fused.weight_int8 = torch.cat([layer.weight_int8 for layer in layers])
        fused.scales = torch.cat([layer.scales for layer in layers])
        if bias is not None:
            fused.bias.data.copy_(bias)
        return fused
    if all(isinstance(layer, Bf16Linear) and layer._packed is None for layer in layers):
        # Before any call (its plain weights are let go once laid out for oneDNN): when the slot path
        # builds its layers. One call for q, k and v took about half the time of three (1 row).
        fused = Bf16Linear.from_weight(torch.cat([layer.weight for layer in layers]), bias)
        start = 0
        for layer in layers:  # rows of the fused weights, held once (as the int4 layers above)
            layer.weight, start = fused.weight[start:start + layer.out_features], start + layer.out_features
        return fused
    if all(isinstance(layer, torch.nn.Linear) for layer in layers):
        fused = torch.nn.Linear(layers[0].in_features, sum(layer.out_features for layer in layers),
                                bias=bias is not None, dtype=layers[0].weight.dtype)
        fused.weight = torch.nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
        if bias is not None:
            fused.bias = torch.nn.Parameter(bias.to(fused.weight.dtype), requires_grad=False)
        return fused
    return None
