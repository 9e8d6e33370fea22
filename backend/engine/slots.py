"""The lean decode path for Llama-architecture models (the default SmolLM2 among them):
the model's forward pass written out over a KV cache of preallocated slots.

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
  weights, prompts go through each layer's bfloat16 copy (`quant.Int4Linear.dense`) and
  decode steps through its 4-bit codes.

The same weights and modules as the Hugging Face model (quantised linear layers
included), so both paths give the same logits up to float rounding (tested).
Same interface as `batch.py`: `read_whole`, `PromptReader`, `Batch`, `Rows`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from backend.engine.prefix_cache import Hit
from backend.engine.quant import ONEDNN_BF16, Bf16Linear, fuse


def supports(model: torch.nn.Module) -> bool:
    config = model.config
    return getattr(config, "model_type", None) == "llama" and getattr(config, "hidden_act", None) == "silu"


class KV:
    """Keys and values of `rows` sequences, each layer one tensor with room to grow.

    Keys are held transposed, [rows, kv_heads, head_dim, capacity], values as they come,
    [rows, kv_heads, capacity, head_dim]: a decode step's attention is then two batched
    matmuls that each read one row's positions as contiguous runs (q·Kᵀ over [head_dim,
    positions], p·V over [positions, head_dim]). Measured, 8 rows, 30 layers: attention alone
    0.72-0.75x SDPA's time at 230 positions (SDPA's q·Kᵀ on untransposed keys is its slow
    part); a whole decode step 0.98x at 200 positions, 0.92-0.95x at 400."""

    def __init__(self, model: torch.nn.Module, rows: int, capacity: int = 256):
        config = model.config
        self.rows, self.capacity = rows, capacity
        self.kv_heads, self.head_dim = config.num_key_value_heads, _head_dim(config)
        self.dtype = model.get_input_embeddings().weight.dtype
        layers = range(config.num_hidden_layers)
        self.keys = [torch.zeros(rows, self.kv_heads, self.head_dim, capacity, dtype=self.dtype) for _ in layers]
        self.values = [torch.zeros(rows, self.kv_heads, capacity, self.head_dim, dtype=self.dtype) for _ in layers]

    def make_room(self, columns: int) -> None:
        """Grow (doubling) until `columns` columns fit; the old contents are kept."""
        if columns <= self.capacity:
            return
        capacity = self.capacity
        while capacity < columns:
            capacity *= 2
        more = capacity - self.capacity
        self.keys = [F.pad(k, (0, more)) for k in self.keys]
        self.values = [F.pad(v, (0, 0, 0, more)) for v in self.values]
        self.capacity = capacity

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
    hidden = llama.embed_tokens(tokens)
    # Prompts go through each layer's bfloat16 copy where it has one, decode steps through its
    # 4-bit codes (in `DecodeStep`, or its compiled copy): the first kernel is fast for many rows,
    # the other for few. Chosen by the call, never by the batch, so a row's numbers do not depend
    # on what else is read or decoded with it.
    if width == 1:
        hidden = decode_step(model)(hidden, positions, keys, values, visible)
    else:
        hidden = _run_layers(_fused_layers(model)[1], _rotary_tables(model), hidden, positions, keys, values,
                             _prompt_attention(visible))
    hidden = hidden[:, -1] if last is None else hidden[torch.arange(rows), last]
    return model.lm_head(F.rms_norm(hidden, hidden.shape[-1:], llama.norm.weight, llama.norm.variance_epsilon))


def _run_layers(layers: list[_Layer], rotary: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
                positions: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], attend) -> torch.Tensor:
    """The decoder layers over `hidden` [rows, t, hidden_size] at `positions` [rows, t]: each
    layer writes its keys and values at those positions, then `attend`s to its cache."""
    rows = positions.shape[0]
    cos, signed_sin = (table[positions][:, None] for table in rotary)  # [rows, 1, t, head_dim]
    row_index = torch.arange(rows)[:, None]
    for layer, layer_keys, layer_values in zip(layers, keys, values):
        heads = layer.qkv(layer.norm(hidden, layer.input_norm))
        heads = heads.view(rows, hidden.shape[1], -1, layer.head_dim).transpose(1, 2)  # q, k and v heads in a row
        # Rotary position, on q's and k's heads at once: x cos + rotate_half(x) sin, where
        # rotate_half(x) sin = roll(x, half) * (-sin | sin) (the sign is folded into the table).
        qk = heads[:, :layer.rotated_heads]
        qk = qk * cos + qk.roll(layer.head_dim // 2, dims=-1) * signed_sin
        q, k, v = qk[:, :layer.query_heads], qk[:, layer.query_heads:], heads[:, layer.rotated_heads:]
        # keys[row, :, :, position] = k[row, :, i] and values[row, :, position] = v[row, :, i]
        # for each row and its i-th position
        layer_keys[row_index, :, :, positions] = k.transpose(1, 2)
        layer_values[row_index, :, positions] = v.transpose(1, 2)
        out = attend(q, layer_keys, layer_values, layer.scale)
        hidden = hidden + layer.o_proj(out.reshape(rows, hidden.shape[1], -1))
        gate, up = layer.gate_up(layer.norm(hidden, layer.post_norm)).chunk(2, dim=-1)
        hidden = hidden + layer.down_proj(F.silu(gate) * up)
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
        self.parts = torch.nn.ModuleList(torch.nn.ModuleList([layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj,
                                                              layer.input_norm, layer.post_norm])
                                         for layer in self.layers)
        cos, signed_sin = _rotary_tables(model)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("signed_sin", signed_sin, persistent=False)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
        return _run_layers(self.layers, (self.cos, self.signed_sin), hidden, positions, keys, values,
                           _decode_attention(visible, keys[0].shape[1], hidden.dtype))


def decode_step(model: torch.nn.Module):
    """What runs a decode step's layers: the compiled copy `compiled.attach` set, else `DecodeStep` eagerly."""
    if (step := model.__dict__.get("_textbot_decode_step")) is None:
        step = use_decode_step(model, DecodeStep(model))
    return step


def use_decode_step(model: torch.nn.Module, step):
    # Kept outside the module tree: the model's state dict and modules stay the model's own.
    model.__dict__["_textbot_decode_step"] = step
    return step


def _decode_attention(visible: torch.Tensor, kv_heads: int, dtype: torch.dtype):
    """Attention for one query per row: q [rows, heads, 1, head_dim] against transposed keys
    [rows, kv_heads, head_dim, capacity] and values [rows, kv_heads, capacity, head_dim] (their
    first `length` columns), as two batched matmuls with each key head's query heads side by
    side (grouped-query attention without repeating the keys). Returns [rows, 1, heads, head_dim]."""
    rows, length = visible.shape[0], visible.shape[-1]
    # The mask as a bias added to the scores: the same for every layer, so built once a step.
    bias = torch.zeros(rows, kv_heads, 1, length, dtype=dtype).masked_fill_(~visible, float("-inf"))

    def attend(q, keys, values, scale):
        heads = q.shape[1]
        q = q.reshape(rows * kv_heads, heads // kv_heads, -1)
        scores = torch.baddbmm(bias.view(rows * kv_heads, 1, length), q, keys[..., :length].flatten(0, 1),
                               alpha=scale)
        out = torch.bmm(scores.softmax(-1), values[:, :, :length].flatten(0, 1))
        return out.view(rows, 1, heads, -1)
    return attend


def _prompt_attention(visible: torch.Tensor):
    """Attention for several queries per row (prompts): SDPA, over the keys as [length, head_dim]
    views. Returns [rows, t, heads, head_dim]."""
    length = visible.shape[-1]

    def attend(q, keys, values, scale):
        out = F.scaled_dot_product_attention(q, keys[..., :length].transpose(-1, -2).contiguous(),
                                             values[:, :, :length], attn_mask=visible, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)
    return attend


@dataclass
class _Layer:
    """A decoder layer's parts as `forward` calls them: q, k and v in one matmul, gate and up in another."""

    qkv: torch.nn.Module
    o_proj: torch.nn.Module
    gate_up: torch.nn.Module
    down_proj: torch.nn.Module
    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    head_dim: int
    scale: float
    query_heads: int
    rotated_heads: int  # query and key heads, which come first in qkv's output

    @staticmethod
    def norm(x: torch.Tensor, rms: torch.nn.Module) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], rms.weight, rms.variance_epsilon)


def _fused_layers(model: torch.nn.Module) -> tuple[list[_Layer], list[_Layer]]:
    """The layers for decode steps, and for prompts (their linear layers' bfloat16 copies where
    they have them). Built once per model and kept on it; the originals stay in place for the
    generic path."""
    if (layers := getattr(model, "_textbot_fused_layers", None)) is None:
        decode = [_fuse_layer(layer) for layer in model.model.layers]
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


def _fuse_layer(layer: torch.nn.Module) -> _Layer:
    attention, mlp = layer.self_attn, layer.mlp
    projections = [attention.q_proj, attention.k_proj, attention.v_proj]
    qkv = fuse(projections) or _Side(projections)
    gate_up = fuse([mlp.gate_proj, mlp.up_proj]) or _Side([mlp.gate_proj, mlp.up_proj])
    query_heads, key_heads = (p.out_features // attention.head_dim for p in projections[:2])
    return _Layer(qkv, attention.o_proj, gate_up, mlp.down_proj,
                  layer.input_layernorm, layer.post_attention_layernorm, attention.head_dim, attention.scaling,
                  query_heads, query_heads + key_heads)


class _Side(torch.nn.Module):
    """Layers that cannot be fused, called one by one, their outputs side by side."""

    def __init__(self, layers: list[torch.nn.Module]):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


def _rotary_tables(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position of the context, [positions, head_dim], computed once
    by the model's own rotary embedding (so its scaling variants hold); sin's first half
    negated, for `forward`'s roll (the same products, bit for bit, as rotate_half's)."""
    if (tables := getattr(model, "_textbot_rotary", None)) is None:
        llama = model.model
        positions = torch.arange(model.config.max_position_embeddings)[None]
        cos, sin = (table[0] for table in llama.rotary_emb(llama.embed_tokens.weight[:1], positions))
        half = sin.shape[-1] // 2
        tables = model._textbot_rotary = (cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))
    return tables


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass
class Rows:
    """Prompts read to their end: their requests, next-token logits (a row each), and their
    keys and values in rows 0..n-1 of `kv`, request i's first `len(prompt_ids)` columns."""

    requests: list
    logits: torch.Tensor
    kv: KV

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
    columns past its prompt, which its first decode step overwrites before any query reads them."""
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
    """The running requests, request i in KV row i, each at its own length."""

    def __init__(self, model: torch.nn.Module, rows: int = 8):
        self.model = model
        self.requests: list = []
        self.kv = KV(model, rows)

    def add(self, rows: Rows) -> None:
        for i, request in enumerate(rows.requests):
            request.length = len(request.prompt_ids)
            if len(self.requests) == self.kv.rows:
                raise RuntimeError("more running requests than KV rows")
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
