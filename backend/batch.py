"""The model side of continuous batching: prompts read into KV caches a chunk at a
time, and the batch of running requests that decodes one token each per forward
pass. No scheduling here (that is `backend/engine.py`), only tensors.

A request here is anything with `prompt_ids`, `length` (its tokens in the cache)
and `next_token` (fed to the model at the next step): the engine's `_Request`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class PromptReader:
    """One prompt fed to the model `read(budget)` tokens at a time into a KV cache of its
    own. A long prompt is thus read across several loop steps, so the batch keeps
    decoding meanwhile, and no single step runs long enough to look like a wedged loop."""

    def __init__(self, model: torch.nn.Module, request):
        self.model, self.request = model, request
        self.cache = DynamicCache()
        self.tokens_read = 0
        self.logits: torch.Tensor | None = None  # the next-token logits, once the whole prompt is read

    @property
    def done(self) -> bool:
        return self.tokens_read == len(self.request.prompt_ids)

    def read(self, budget: int) -> int:
        """Feed the next `budget` prompt tokens (fewer at the end); returns how many."""
        chunk = self.request.prompt_ids[self.tokens_read:self.tokens_read + budget]
        self.logits, self.cache = prefill(self.model, chunk, self.cache)
        self.tokens_read += len(chunk)
        return len(chunk)


class Batch:
    """The running requests and their KV cache, left-padded to one length so one
    forward pass decodes a token for each. `mask` marks each row's real tokens."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.requests: list = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length], 1 = real token, 0 = padding

    def add(self, prompt: PromptReader) -> None:
        """Merge a fully read prompt's cache in, as a new row."""
        request, cache = prompt.request, prompt.cache
        request.length = len(request.prompt_ids)
        mask = torch.ones(1, request.length, dtype=torch.long)
        if not self.requests:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], request.length)
            self.cache = _concat_rows(_pad_left(self.cache, width), _pad_left(cache, width))
            self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(mask, width)])
        self.requests.append(request)

    def step(self) -> torch.Tensor:
        """Feed every request its last token; returns the next-token logits, one row each."""
        tokens = torch.tensor([[r.next_token] for r in self.requests])
        positions = torch.tensor([[r.length] for r in self.requests])
        self.mask = F.pad(self.mask, (0, 1), value=1)
        logits, self.cache = decode_step(self.model, tokens, positions, self.mask, self.cache)
        for request in self.requests:
            request.length += 1
        return logits

    def keep(self, kept: list) -> None:
        """Retire every request not in `kept`, and the padding no remaining row needs."""
        if len(kept) == len(self.requests):
            return
        if not kept:
            self.requests, self.cache, self.mask = [], None, None
            return
        rows = torch.tensor([self.requests.index(r) for r in kept])
        mask = self.mask[rows]
        start = int((mask.sum(0) > 0).nonzero()[0])  # columns before it are padding in every row
        self.mask = mask[:, start:]
        self.cache = _map_cache(self.cache, lambda t: t[rows, :, start:])
        self.requests = kept


def prefill(model, prompt_ids: list[int], cache: DynamicCache):
    # Positions continue from the cache's length. logits_to_keep: only the last
    # position's logits are needed, not the whole chunk's.
    out = model(input_ids=torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1], out.past_key_values


def decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache):
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask,
                past_key_values=cache, use_cache=True)
    return out.logits[:, -1], out.past_key_values


def _map_cache(cache: DynamicCache, fn) -> DynamicCache:
    return DynamicCache(ddp_cache_data=[(fn(k), fn(v)) for k, v, *_ in cache])


def _pad_left(cache: DynamicCache, width: int) -> DynamicCache:
    return _map_cache(cache, lambda t: F.pad(t, (0, 0, width - t.shape[-2], 0)))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[1], 0))


def _concat_rows(a: DynamicCache, b: DynamicCache) -> DynamicCache:
    return DynamicCache(ddp_cache_data=[(torch.cat([ka, kb]), torch.cat([va, vb]))
                                        for (ka, va, *_), (kb, vb, *_) in zip(a, b)])
