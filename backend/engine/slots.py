"""The lean decode path, the engine's shared transformer: a decoder-only model's forward pass
written out over a KV cache of preallocated slots, for every family in `families/` (Llama,
Mistral, Qwen2, Qwen3, Gemma 3; the default SmolLM2 is a Llama). A family's differences (its
norms, activation, per-head query and key norms, sliding windows) are said in its own small file
there and read here once, when the layers are fused.

Why not the Hugging Face forward with a DynamicCache (`batch.py`, still used for other
architectures): each decode step there concatenates every layer's whole cache to append
one column, re-pads caches on every admission, and spends about a third of a step in
Python around the ops (profiled: docs/BENCHMARKS.md). Here:

- `KV` holds, per layer, keys and values for `rows` sequences in one preallocated
  tensor [rows, kv_heads, capacity, head_dim] (capacity grows by doubling). Each row
  keeps its own length; a step writes one column per row in place.
- Decoding rows sit in rows 0..n-1, so attention reads a view, never a gathered copy.
  A retired row's place is filled by moving rows up, once, at retirement.
- One function, `forward`, serves prompts and decode steps alike: queries at given
  positions attend to every cached column at or before their own position. With int4
  weights, decode steps go through the 4-bit codes, and prompts too unless the model keeps
  bfloat16 copies for them (`model.prompt_weights: bfloat16`, `quant.Int4Linear.dense`).

The same weights and modules as the Hugging Face model (quantised linear layers
included), so both paths give the same logits up to float rounding (tested).
Same interface as `batch.py`: `read_whole`, `PromptReader`, `Batch`, `Rows`.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from backend.engine import families
from backend.engine.kv_budget import STEP
from backend.engine.prefix_cache import Hit
from backend.engine.quant import ONEDNN_BF16, Bf16Linear, fuse


def config_dict(config) -> dict:
    """A model's config as a dict: transformers' config object, or `modules.py`'s namespace."""
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def why_not(model: torch.nn.Module) -> str | None:
    """None if this path runs the model; else why it goes through transformers' forward instead."""
    return families.why_not(config_dict(model.config))


def supports(model: torch.nn.Module) -> bool:
    return why_not(model) is None


class KV:
    """Keys and values of `rows` sequences, each layer one tensor with room to grow.

    Keys are held transposed, [rows, kv_heads, head_dim, capacity], values as they come,
    [rows, kv_heads, capacity, head_dim]: a decode step's attention is then two batched
    matmuls that each read one row's positions as contiguous runs (q·Kᵀ over [head_dim,
    positions], p·V over [positions, head_dim]). Measured, 8 rows, 30 layers: attention alone
    0.72-0.75x SDPA's time at 230 positions (SDPA's q·Kᵀ on untransposed keys is its slow
    part); a whole decode step 0.98x at 200 positions, 0.92-0.95x at 400."""

    def __init__(self, model: torch.nn.Module, rows: int, capacity: int = STEP):
        config = model.config
        self.rows, self.capacity = rows, capacity
        # The most columns growing may reach (the KV budget's plan for a batch); None: no cap.
        self.capacity_cap: int | None = None
        self.layers = config.num_hidden_layers
        self.kv_heads, self.head_dim = config.num_key_value_heads, _head_dim(config)
        self.dtype = kv_dtype(model)
        self.keys, self.values = self._zeros(rows, capacity)

    def _zeros(self, rows: int, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return ([torch.zeros(rows, self.kv_heads, self.head_dim, capacity, dtype=self.dtype) for _ in range(self.layers)],
                [torch.zeros(rows, self.kv_heads, capacity, self.head_dim, dtype=self.dtype) for _ in range(self.layers)])

    @property
    def nbytes(self) -> int:
        return self.rows * self.capacity * self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize

    def make_room(self, columns: int) -> None:
        """Grow (doubling, up to `capacity_cap`) until `columns` columns fit; the contents are kept."""
        if columns <= self.capacity:
            return
        capacity = max(self.capacity, STEP)
        while capacity < columns:
            capacity *= 2
        if self.capacity_cap is not None:
            capacity = max(min(capacity, self.capacity_cap), columns)
        self.resize(self.rows, capacity)

    def resize(self, rows: int, capacity: int) -> None:
        """Reallocate for `rows` rows of `capacity` columns, keeping what fits of the contents.
        One tensor at a time, each let go once copied: while it runs the KV holds at most one
        tensor more than before or after (which the KV budget's plan counts)."""
        if (rows, capacity) == (self.rows, self.capacity):
            return
        kept_rows, kept_columns = min(rows, self.rows), min(capacity, self.capacity)
        for i, old in enumerate(self.keys):
            self.keys[i] = torch.zeros(rows, self.kv_heads, self.head_dim, capacity, dtype=self.dtype)
            self.keys[i][:kept_rows, ..., :kept_columns] = old[:kept_rows, ..., :kept_columns]
            del old
        for i, old in enumerate(self.values):
            self.values[i] = torch.zeros(rows, self.kv_heads, capacity, self.head_dim, dtype=self.dtype)
            self.values[i][:kept_rows, :, :kept_columns] = old[:kept_rows, :, :kept_columns]
            del old
        self.rows, self.capacity = rows, capacity

    def copy_row(self, source: KV, source_row: int, row: int, length: int) -> None:
        self.make_room(length)
        for mine, theirs in zip(self.keys, source.keys):
            mine[row, ..., :length] = theirs[source_row, ..., :length]
        for mine, theirs in zip(self.values, source.values):
            mine[row, :, :length] = theirs[source_row, :, :length]

    def copy_prefix(self, hit: Hit, row: int) -> None:
        """A cached prefix's keys and values into `row`'s first columns."""
        self.make_room(hit.length)
        for mine, cached in zip(self.keys, hit.entry.keys):
            mine[row, ..., :hit.length] = cached[:, :hit.length].transpose(-1, -2)
        for mine, cached in zip(self.values, hit.entry.values):
            mine[row, :, :hit.length] = cached[:, :hit.length]

    def columns(self, row: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of `row`'s first `length` keys and values, [kv_heads, length, head_dim] per layer
        (the prefix cache's form)."""
        return ([k[row, ..., :length].transpose(-1, -2) for k in self.keys],
                [v[row, :, :length] for v in self.values])

    def take(self, rows: torch.Tensor) -> KV:
        """A new KV of the given rows (repeats allowed), in that order."""
        taken = copy.copy(self)
        taken.keys, taken.values = [k[rows] for k in self.keys], [v[rows] for v in self.values]
        taken.rows = len(rows)
        return taken

    def move_rows(self, rows: torch.Tensor, length: int) -> None:
        """Rows `rows` become rows 0..len(rows)-1 (the first `length` columns)."""
        for k in self.keys:
            k[:len(rows), ..., :length] = k[rows, ..., :length]
        for v in self.values:
            v[:len(rows), :, :length] = v[rows, :, :length]


def forward(model: torch.nn.Module, kv: KV, tokens: torch.Tensor, positions: torch.Tensor,
            last: torch.Tensor | None = None) -> torch.Tensor:
    """Run `tokens` [rows, t] at `positions` [rows, t] through the model, writing their keys
    and values into rows 0..rows-1 of `kv` at those positions. Returns the logits of the
    last position of each row ([rows, vocab]), or of position `last[row]` if given."""
    rows, width = tokens.shape
    length = int(positions.max()) + 1
    kv.make_room(length)
    keys, values = [k[:rows] for k in kv.keys], [v[:rows] for v in kv.values]
    # A query sees the cached columns at or before its own position.
    visible = (torch.arange(length) <= positions[..., None])[:, None]  # [rows, 1, t, length]
    llama = model.model
    hidden = llama.embed_tokens(tokens)  # the embedding module scales it where its family does (Gemma)
    # Prompts go through each layer's bfloat16 copy where it has one, decode steps through its
    # 4-bit codes (in `DecodeStep`, or its compiled copy): the first kernel is fast for many rows,
    # the other for few. Chosen by the call, never by the batch, so a row's numbers do not depend
    # on what else is read or decoded with it.
    if width == 1:
        hidden = decode_step(model)(hidden, positions, keys, values, visible)
    else:
        hidden = _run_layers(_fused_layers(model)[1], _rotary_tables(model), hidden, positions, keys, values,
                             _prompt_attention(visible, positions))
    hidden = hidden[:, -1] if last is None else hidden[torch.arange(rows), last]
    return model.lm_head(_final_norm(model)(hidden))


def _run_layers(layers: list[_Layer], rotary: dict[str, tuple[torch.Tensor, torch.Tensor]], hidden: torch.Tensor,
                positions: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], attend) -> torch.Tensor:
    """The decoder layers over `hidden` [rows, t, hidden_size] at `positions` [rows, t]: each
    layer writes its keys and values at those positions, then `attend`s to its cache."""
    rows = positions.shape[0]
    # Each kind of layer's cos and sin at these positions, [rows, 1, t, head_dim]
    angles = {kind: tuple(table[positions][:, None] for table in tables) for kind, tables in rotary.items()}
    row_index = torch.arange(rows)[:, None]
    for layer, layer_keys, layer_values in zip(layers, keys, values):
        heads = layer.qkv(layer.attention_norm(hidden))
        heads = heads.view(rows, hidden.shape[1], -1, layer.head_dim).transpose(1, 2)  # q, k and v heads in a row
        qk = heads[:, :layer.rotated_heads]
        if layer.qk_norm is not None:
            qk = layer.qk_norm(qk)
        # Rotary position, on q's and k's heads at once: x cos + rotate_half(x) sin, where
        # rotate_half(x) sin = roll(x, half) * (-sin | sin) (the sign is folded into the table).
        cos, signed_sin = angles[layer.rotary]
        qk = qk * cos + qk.roll(layer.head_dim // 2, dims=-1) * signed_sin
        q, k, v = qk[:, :layer.query_heads], qk[:, layer.query_heads:], heads[:, layer.rotated_heads:]
        # keys[row, :, :, position] = k[row, :, i] and values[row, :, position] = v[row, :, i]
        # for each row and its i-th position
        layer_keys[row_index, :, :, positions] = k.transpose(1, 2)
        layer_values[row_index, :, positions] = v.transpose(1, 2)
        out = layer.o_proj(attend(q, layer_keys, layer_values, layer.scale, layer.window)
                           .reshape(rows, hidden.shape[1], -1))
        hidden = hidden + (out if layer.attention_out_norm is None else layer.attention_out_norm(out))
        gate, up = layer.gate_up(layer.mlp_norm(hidden)).chunk(2, dim=-1)
        out = layer.down_proj(layer.activation(gate) * up)
        hidden = hidden + (out if layer.mlp_out_norm is None else layer.mlp_out_norm(out))
    return hidden


class DecodeStep(torch.nn.Module):
    """A decode step's layers (one position a row) as a module of their own: what `forward`
    runs eagerly, and what `compiled.py` exports and compiles ahead of time.

    `forward(hidden [rows, 1, hidden_size], positions [rows, 1], keys, values, visible
    [rows, 1, 1, length])`: keys and values are each layer's cache rows (full capacity; the
    step writes its column in place), `visible` says which of the first `length` columns each
    row attends to. Returns the last layer's output, [rows, 1, hidden_size]."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.layers = _fused_layers(model)[0]
        # Registered, so that torch.export finds the weights as this module's own.
        self.parts = torch.nn.ModuleList(torch.nn.ModuleList(layer.modules()) for layer in self.layers)
        self.kinds = sorted(_rotary_tables(model))
        for i, kind in enumerate(self.kinds):
            cos, signed_sin = _rotary_tables(model)[kind]
            self.register_buffer(f"cos_{i}", cos, persistent=False)
            self.register_buffer(f"signed_sin_{i}", signed_sin, persistent=False)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
        rotary = {kind: (getattr(self, f"cos_{i}"), getattr(self, f"signed_sin_{i}"))
                  for i, kind in enumerate(self.kinds)}
        return _run_layers(self.layers, rotary, hidden, positions, keys, values,
                           _decode_attention(visible, positions, keys[0].shape[1], hidden.dtype))


def decode_step(model: torch.nn.Module):
    """What runs a decode step's layers: the compiled copy `compiled.attach` set, else `DecodeStep` eagerly."""
    if (step := model.__dict__.get("_textbot_decode_step")) is None:
        step = use_decode_step(model, DecodeStep(model))
    return step


def use_decode_step(model: torch.nn.Module, step):
    # Kept outside the module tree: the model's state dict and modules stay the model's own.
    model.__dict__["_textbot_decode_step"] = step
    return step


def _windowed(visible: torch.Tensor, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """`visible` [rows, 1, t, length] narrowed to the `window` positions up to each query's own
    (a sliding-window layer's view), or as it is for a layer that sees everything."""
    if window is None:
        return visible
    return visible & (torch.arange(visible.shape[-1]) > positions[..., None] - window)[:, None]


def _decode_attention(visible: torch.Tensor, positions: torch.Tensor, kv_heads: int, dtype: torch.dtype):
    """Attention for one query per row: q [rows, heads, 1, head_dim] against transposed keys
    [rows, kv_heads, head_dim, capacity] and values [rows, kv_heads, capacity, head_dim] (their
    first `length` columns), as two batched matmuls with each key head's query heads side by
    side (grouped-query attention without repeating the keys). Returns [rows, 1, heads, head_dim]."""
    rows, length = visible.shape[0], visible.shape[-1]
    biases: dict[int | None, torch.Tensor] = {}

    def attend(q, keys, values, scale, window):
        # The mask as a bias added to the scores: the same for every layer of a window, so built once a step.
        if (bias := biases.get(window)) is None:
            seen = _windowed(visible, positions, window)
            bias = biases[window] = torch.zeros(rows, kv_heads, 1, length, dtype=dtype).masked_fill_(
                ~seen, float("-inf")).view(rows * kv_heads, 1, length)
        heads = q.shape[1]
        q = q.reshape(rows * kv_heads, heads // kv_heads, -1)
        scores = torch.baddbmm(bias, q, keys[..., :length].flatten(0, 1), alpha=scale)
        out = torch.bmm(scores.softmax(-1), values[:, :, :length].flatten(0, 1))
        return out.view(rows, 1, heads, -1)
    return attend


def _prompt_attention(visible: torch.Tensor, positions: torch.Tensor):
    """Attention for several queries per row (prompts): SDPA, over the keys as [length, head_dim]
    views. Returns [rows, t, heads, head_dim]."""
    length = visible.shape[-1]

    def attend(q, keys, values, scale, window):
        out = F.scaled_dot_product_attention(q, keys[..., :length].transpose(-1, -2).contiguous(),
                                             values[:, :, :length], attn_mask=_windowed(visible, positions, window),
                                             scale=scale, enable_gqa=True)
        return out.transpose(1, 2)
    return attend


@dataclass
class _Layer:
    """A decoder layer's parts as `forward` calls them: q, k and v in one matmul, gate and up in
    another, and what its family sets (norms, activation, window, rotary table)."""

    qkv: torch.nn.Module
    o_proj: torch.nn.Module
    gate_up: torch.nn.Module
    down_proj: torch.nn.Module
    attention_norm: _Norm
    mlp_norm: _Norm
    attention_out_norm: _Norm | None
    mlp_out_norm: _Norm | None
    qk_norm: _HeadNorm | None
    activation: object  # the MLP's gate activation, a function
    window: int | None  # positions seen back from each query's own, None for all
    rotary: str  # which rotary table (a layer type: Gemma's sliding layers have their own)
    head_dim: int
    scale: float
    query_heads: int
    rotated_heads: int  # query and key heads, which come first in qkv's output

    def modules(self) -> list[torch.nn.Module]:
        parts = [self.qkv, self.o_proj, self.gate_up, self.down_proj, self.attention_norm, self.mlp_norm,
                 self.attention_out_norm, self.mlp_out_norm, self.qk_norm]
        return [part for part in parts if part is not None]


class _Norm(torch.nn.Module):
    """RMSNorm with its family's scale folded into the weight once: x / rms(x) * (offset + weight)
    (Gemma's norms store weight - 1). The weight is the model's own tensor when the offset is 0."""

    def __init__(self, norm: torch.nn.Module, offset: float):
        super().__init__()
        weight = norm.weight.detach()
        self.register_buffer("weight", weight if not offset else (offset + weight.float()).to(weight.dtype),
                             persistent=False)
        self.eps = _eps(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


class _HeadNorm(torch.nn.Module):
    """Qwen3's and Gemma 3's q_norm and k_norm at once: each query and key head normalised over
    its own width, with q_norm's weights on the query heads and k_norm's on the key heads."""

    def __init__(self, q_norm: torch.nn.Module, k_norm: torch.nn.Module, query_heads: int, key_heads: int,
                 offset: float):
        super().__init__()
        weights = [norm.weight.detach().float() + offset for norm in (q_norm, k_norm)]
        per_head = torch.cat([weights[0].expand(query_heads, -1), weights[1].expand(key_heads, -1)])
        self.register_buffer("weight", per_head[:, None, :].to(q_norm.weight.dtype), persistent=False)
        self.eps = _eps(q_norm)

    def forward(self, qk: torch.Tensor) -> torch.Tensor:
        """qk [rows, query and key heads, t, head_dim]."""
        return F.rms_norm(qk, qk.shape[-1:], eps=self.eps) * self.weight


def _eps(norm: torch.nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or norm.eps


def _final_norm(model: torch.nn.Module) -> _Norm:
    if (norm := model.__dict__.get("_textbot_final_norm")) is None:
        family = families.family_of(config_dict(model.config))
        norm = model.__dict__["_textbot_final_norm"] = _Norm(model.model.norm, family.norm_offset)
    return norm


def _fused_layers(model: torch.nn.Module) -> tuple[list[_Layer], list[_Layer]]:
    """The layers for decode steps, and for prompts (their linear layers' bfloat16 copies where
    they have them). Built once per model and kept on it; the originals stay in place for the
    generic path."""
    if (layers := getattr(model, "_textbot_fused_layers", None)) is None:
        config = config_dict(model.config)
        family, per_kind = families.family_of(config), len(_rotary_tables(model)) > 1
        decode = [_fuse_layer(layer, family, config, i, config["layer_types"][i] if per_kind else _ONE_KIND)
                  for i, layer in enumerate(model.model.layers)]
        linears = ("qkv", "o_proj", "gate_up", "down_proj")
        prompt = [replace(layer, **{name: _for_prompts(getattr(layer, name)) for name in linears})
                  for layer in decode]
        layers = model._textbot_fused_layers = (decode, prompt)
    return layers


def prepare(model: torch.nn.Module) -> None:
    """Fuse the layers and lay the bfloat16 weights in use out for oneDNN at start, so that
    the first request does not wait for it (0.18 s for the default model)."""
    parts = [model.get_output_embeddings()]
    for layer in _fused_layers(model)[1]:
        parts += [layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj]
    for part in parts:
        for module in part.layers if isinstance(part, _Side) else [part]:
            if isinstance(module, Bf16Linear):
                module.pack()


def _for_prompts(linear: torch.nn.Module) -> torch.nn.Module:
    """The layer's bfloat16 copy, where it has one and the CPU multiplies bfloat16 natively
    (without, the copy would be float32 in memory and no faster than the int4 kernel)."""
    if isinstance(linear, _Side):
        return _Side([_for_prompts(layer) for layer in linear.layers])
    dense = getattr(linear, "dense", None)
    return linear if dense is None or not ONEDNN_BF16 else dense


def _fuse_layer(layer: torch.nn.Module, family: families.Family, config: dict, index: int, rotary: str) -> _Layer:
    attention, mlp = layer.self_attn, layer.mlp
    projections = [attention.q_proj, attention.k_proj, attention.v_proj]
    qkv = fuse(projections) or _Side(projections)
    gate_up = fuse([mlp.gate_proj, mlp.up_proj]) or _Side([mlp.gate_proj, mlp.up_proj])
    query_heads, key_heads = (p.out_features // attention.head_dim for p in projections[:2])

    def norm(name: str | None) -> _Norm | None:
        return None if name is None else _Norm(getattr(layer, name), family.norm_offset)
    qk_norm = (_HeadNorm(attention.q_norm, attention.k_norm, query_heads, key_heads, family.norm_offset)
               if family.qk_norm else None)
    return _Layer(qkv, attention.o_proj, gate_up, mlp.down_proj,
                  attention_norm=norm(family.attention_norm), mlp_norm=norm(family.mlp_norm),
                  attention_out_norm=norm(family.attention_out_norm), mlp_out_norm=norm(family.mlp_out_norm),
                  qk_norm=qk_norm, activation=families.ACTIVATIONS[family.activation(config)],
                  window=family.window(config, index), rotary=rotary, head_dim=attention.head_dim,
                  scale=attention.scaling, query_heads=query_heads, rotated_heads=query_heads + key_heads)


class _Side(torch.nn.Module):
    """Layers that cannot be fused, called one by one, their outputs side by side."""

    def __init__(self, layers: list[torch.nn.Module]):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


_ONE_KIND = "full_attention"  # the rotary table's name when every layer shares one


def _rotary_tables(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos and sin for every position of the context, [positions, head_dim], computed once
    by the model's own rotary embedding (so its scaling variants hold); sin's first half
    negated, for `forward`'s roll (the same products, bit for bit, as rotate_half's). One pair
    per layer type where the rotary module keeps one per type (Gemma 3: sliding layers rotate
    with a base of their own), else one pair for all."""
    if (tables := getattr(model, "_textbot_rotary", None)) is None:
        decoder = model.model
        positions = torch.arange(model.config.max_position_embeddings)[None]
        sample = decoder.embed_tokens.weight[:1]
        if "layer_type" in inspect.signature(decoder.rotary_emb.forward).parameters:
            kinds = {kind: decoder.rotary_emb(sample, positions, kind) for kind in set(model.config.layer_types)}
        else:
            kinds = {_ONE_KIND: decoder.rotary_emb(sample, positions)}
        tables = {}
        for kind, (cos, sin) in kinds.items():
            cos, sin = cos[0], sin[0]
            half = sin.shape[-1] // 2
            tables[kind] = (cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))
        model._textbot_rotary = tables
    return tables


def kv_dtype(model: torch.nn.Module) -> torch.dtype:
    """The keys' and values' dtype: the activations' (a norm's weight is in it; the embedding
    may be stored quantised)."""
    return model.model.norm.weight.dtype


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass
class Rows:
    """Prompts read to their end: their requests, next-token logits (a row each), and their
    keys and values in rows 0..n-1 of `kv`, request i's first `len(prompt_ids)` columns."""

    requests: list
    logits: torch.Tensor
    kv: KV

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    def select(self, kept: list[bool]) -> Rows:
        rows = torch.tensor([i for i, keep in enumerate(kept) if keep])
        requests = [r for r, keep in zip(self.requests, kept) if keep]
        self.kv.move_rows(rows, max(len(r.prompt_ids) for r in requests))
        return Rows(requests, self.logits[rows], self.kv)

    def take(self, rows: list[int], requests: list) -> Rows:
        """Rows `rows` (a row may repeat: replies to one prompt) for `requests`, in a KV of their own."""
        index = torch.tensor(rows)
        return Rows(requests, self.logits[index], self.kv.take(index))

    def columns(self, request) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.kv.columns(self.requests.index(request), request.length)


def read_whole(model: torch.nn.Module, readers: list[PromptReader]) -> Rows:
    """What is left of several prompts, in one forward pass: each row starts with its cached
    prefix (if any), then its unread tokens, right-padded to the longest. A padded row writes
    columns past its prompt, which its first decode step overwrites before any query reads them;
    the engine groups prompts so that these stay within the longest prompt's columns (the KV's width)."""
    rows, width = len(readers), max(reader.remaining for reader in readers)
    kv = KV(model, rows, capacity=max(len(reader.request.prompt_ids) for reader in readers))
    tokens = torch.zeros(rows, width, dtype=torch.long)
    for row, reader in enumerate(readers):
        unread = reader.request.prompt_ids[reader.tokens_read:]
        tokens[row, :len(unread)] = torch.tensor(unread)
        if reader.prefix:
            kv.copy_prefix(reader.prefix, row)
    starts = torch.tensor([reader.tokens_read for reader in readers])
    # Padding may run past the context's last position; it is never read, so it may share one.
    positions = (starts[:, None] + torch.arange(width)).clamp(max=model.config.max_position_embeddings - 1)
    last = torch.tensor([reader.remaining - 1 for reader in readers])
    logits = forward(model, kv, tokens, positions, last)
    for reader in readers:
        reader.finish()
    return Rows([reader.request for reader in readers], logits, kv)


class PromptReader:
    """An admitted prompt until it is read: its cached prefix (`prefix`, from the prefix
    cache) is copied in, the rest is read with other prompts by `read_whole`, or, too long
    for a step's budget, `read(budget)` tokens at a time into a KV row of its own, across
    several loop steps (the batch decodes on meanwhile)."""

    def __init__(self, model: torch.nn.Module, request, prefix: Hit | None = None):
        self.model, self.request, self.prefix = model, request, prefix
        self.kv: KV | None = None  # allocated at the first chunk
        self.tokens_read = prefix.length if prefix else 0
        self.logits: torch.Tensor | None = None

    @property
    def remaining(self) -> int:
        return len(self.request.prompt_ids) - self.tokens_read

    @property
    def started(self) -> bool:
        """Read a chunk already: the rest must go on in this reader's own KV row."""
        return self.kv is not None

    @property
    def done(self) -> bool:
        return self.remaining == 0

    @property
    def nbytes(self) -> int:
        """The keys and values it holds of its own (a prompt read in chunks)."""
        return self.kv.nbytes if self.kv is not None else 0

    def read(self, budget: int) -> None:
        if self.kv is None:
            self.kv = KV(self.model, 1, capacity=len(self.request.prompt_ids))
            if self.prefix:
                self.kv.copy_prefix(self.prefix, 0)
                self.finish()
        chunk = self.request.prompt_ids[self.tokens_read:self.tokens_read + budget]
        positions = torch.arange(self.tokens_read, self.tokens_read + len(chunk))[None]
        self.logits = forward(self.model, self.kv, torch.tensor([chunk]), positions)[0]
        self.tokens_read += len(chunk)

    def finish(self) -> None:
        """The cached prefix is copied: the cache may let it go."""
        if self.prefix:
            self.prefix.release()
            self.prefix = None

    def rows(self) -> Rows:
        return Rows([self.request], self.logits[None], self.kv)


class Batch:
    """The running requests, request i in KV row i, each at its own length.

    Its KV is allocated as the requests come, within what `reserve` allows (the KV budget's
    plan): rows in powers of two, columns doubling; let go when the batch empties."""

    def __init__(self, model: torch.nn.Module, rows: int = 8):
        self.model = model
        self.requests: list = []
        self.kv = KV(model, 0, 0)
        self.reserved = (rows, None)  # rows and columns the KV may grow to (None: any)

    @property
    def allocated(self) -> tuple[int, int]:
        """The KV's rows and columns now."""
        return self.kv.rows, self.kv.capacity

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    def reserve(self, rows: int, capacity: int | None) -> None:
        """Grow to no more than `rows` rows of `capacity` columns from now on. Shrinks at once to
        nothing when the batch is empty, and to the reservation when the KV holds over twice it
        (so the memory of a long reply that ended goes back to the prefix cache, without
        reallocating at every reply's end)."""
        self.reserved = (rows, capacity)
        self.kv.capacity_cap = capacity
        if not self.requests:
            self.kv.resize(0, 0)
        elif capacity is not None and self.kv.rows * self.kv.capacity > 2 * rows * capacity:
            self.kv.resize(max(rows, len(self.requests)), max(capacity, max(r.length for r in self.requests)))

    def add(self, rows: Rows) -> None:
        needed = len(self.requests) + len(rows.requests)
        if needed > self.kv.rows:
            grown = max(self.kv.rows, 1)
            while grown < needed:
                grown *= 2
            self.kv.resize(max(min(grown, self.reserved[0]), needed), self.kv.capacity)
        for i, request in enumerate(rows.requests):
            request.length = len(request.prompt_ids)
            self.kv.copy_row(rows.kv, i, len(self.requests), request.length)
            self.requests.append(request)

    def step(self) -> torch.Tensor:
        """Feed every request its last token; returns the next-token logits, one row each."""
        tokens = torch.tensor([[r.next_token] for r in self.requests])
        positions = torch.tensor([[r.length] for r in self.requests])
        logits = forward(self.model, self.kv, tokens, positions)
        for request in self.requests:
            request.length += 1
        return logits

    def columns(self, request) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A running request's keys and values so far (views), for the prefix cache."""
        return self.kv.columns(self.requests.index(request), request.length)

    def keep(self, kept: list) -> None:
        """Retire every request not in `kept`; the others move up to rows 0..len(kept)-1."""
        if len(kept) == len(self.requests):
            return
        if kept:
            rows = torch.tensor([self.requests.index(r) for r in kept])
            self.kv.move_rows(rows, max(r.length for r in kept))
        self.requests = kept
