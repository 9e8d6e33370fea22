"""The prefix cache: keys and values of finished requests, kept so the next turn of a
conversation reads only what is new.

A chat client sends the whole conversation every turn. Its tokens start with the
previous turn's prompt and reply, whose keys and values this replica computed a
moment ago; keeping them turns a prompt of n tokens into a read of the last few.

Entries are keyed by the exact token ids whose keys and values they hold (the
prompt, then the reply as generated). A new prompt reuses the entry sharing its
longest common prefix, up to the first token that differs. That is what makes it
correct when the conversation does not re-tokenise as it was generated (a reply's
text may encode to other ids than those sampled, a chat template may rewrite an
earlier turn): the match simply ends earlier.

One cache per engine, used by its decode loop thread only. Its room is what the engine's KV
budget leaves beside the rows (`kv_budget.py`), so it changes as replies come and go (`fit`).
It counts the bytes of the tensors held; least recently used entries go first, except those a
request admitted but not yet read still needs (pinned by its `Hit` until released).
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Entry:
    """Keys and values of the sequence `ids`: one [kv_heads, len(ids), head_dim] tensor per layer each."""

    ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pins: int = 0
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Hit:
    """The longest cached prefix of a prompt: `entry`'s first `length` columns."""

    entry: Entry
    length: int

    def release(self) -> None:
        """The request that looked this up has copied it (or gone): the entry may be evicted."""
        self.entry.pins -= 1


@dataclass
class PrefixCacheStats:
    """Running totals, for the replica's metrics."""

    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, read from the cache instead of computed
    evictions: int = 0
    bytes: int = 0  # held now


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes  # the room it has now (`fit`)
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()  # oldest use first
        self._ids = itertools.count()
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pinned_bytes(self) -> int:
        """Held by entries a request still has to copy: these cannot be evicted."""
        return sum(entry.nbytes for entry in self._entries.values() if entry.pins)

    def fit(self, budget_bytes: int) -> None:
        """Room for `budget_bytes` from now on: evict the least recently used unpinned entries
        until what is held fits (pinned ones stay; the engine plans so that they fit)."""
        self.budget_bytes = max(budget_bytes, 0)
        self._evict()

    def lookup(self, prompt_ids: list[int], pin_room: int | None = None) -> Hit | None:
        """The longest cached prefix of `prompt_ids` that leaves at least its last token to
        read (its logits are the reply's first), pinned until the hit is released. None if no entry
        shares a token with it, or if pinning its entry would take the pinned bytes past `pin_room`
        (then it could not be evicted to make room for the rows: the prompt is read whole)."""
        prompt = torch.tensor(prompt_ids)
        best, best_key, length = None, None, 0
        for key, entry in self._entries.items():
            if (shared := _common_prefix(entry.ids, prompt)) > length:
                best, best_key, length = entry, key, shared
        length = min(length, len(prompt_ids) - 1)
        self.stats.queried_tokens += len(prompt_ids)
        if best is None or length < 1:
            return None
        if pin_room is not None and not best.pins and self.pinned_bytes + best.nbytes > pin_room:
            return None
        self._entries.move_to_end(best_key)
        best.pins += 1
        self.stats.hit_tokens += length
        return Hit(best, length)

    def store(self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep copies of a finished request's keys and values ([kv_heads, len(ids), head_dim]
        per layer, views into the batch are fine). An entry the new one extends is dropped;
        a sequence already held whole is only marked used."""
        new = torch.tensor(ids)
        for key, entry in list(self._entries.items()):
            shared = _common_prefix(entry.ids, new)
            if shared == len(new):  # held already (this or a longer sequence)
                self._entries.move_to_end(key)
                return
            if shared == len(entry) and not entry.pins:  # the new entry covers it
                self._drop(key)
        # Room first, then the copy: the cache never holds more than its budget, even for a moment.
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if nbytes > self.budget_bytes - self.pinned_bytes:
            return
        self._evict(room_for=nbytes)
        entry = Entry(new, [k.clone() for k in keys], [v.clone() for v in values])
        self._entries[next(self._ids)] = entry
        self.stats.bytes += entry.nbytes

    def _evict(self, room_for: int = 0) -> None:
        for key in [key for key, entry in self._entries.items() if not entry.pins]:
            if self.stats.bytes + room_for <= self.budget_bytes:
                break
            self._drop(key)
            self.stats.evictions += 1

    def _drop(self, key: int) -> None:
        self.stats.bytes -= self._entries.pop(key).nbytes


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n
