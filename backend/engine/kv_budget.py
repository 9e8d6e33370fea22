"""The KV budget: one bound, set up front (`engine.kv_cache_mb`), on all the keys and values an
engine holds: the running replies' rows, the prompts being read, and the prefix cache.

What the bytes are. The slot path (`slots.KV`) keeps the running replies' keys and values in
one tensor per layer, [rows, kv_heads, head_dim, capacity]: every row has the same capacity,
the longest reply's (attention then reads them in one batched matmul). So the batch costs
rows x capacity x one token's bytes, not the sum of the replies' lengths. The engine plans
with that, not with a rosier figure:

- a reply reserves, when it is admitted, the most tokens it can reach: its prompt and its
  token limit (`_Request.end`). The batch's rows grow in powers of two up to `max_running`, its
  capacity in steps of `STEP` tokens up to the longest reservation, and never past them;
- growing or shrinking, the batch reallocates one layer's keys or values at a time, so it
  holds one such tensor more meanwhile (`tensors`: how many it is split into);
- a prompt being read holds a KV of its own, its prompt's length, until it joins the batch
  (and a copy per reply when it has several);
- the prefix cache gets what the two leave, and evicts its least recently used entries to
  stay within it.

A request waits in the queue (and is refused with the 503 of today past `max_waiting`) while
its reservation does not fit beside the others'; a request that could not fit even alone is
refused at once, or its reply shortened, as one that overflows the model's context is. The
sums below are all of it; the engine measures what it has allocated as it goes (`Engine.kv_usage`,
its peak held to the budget by tests/test_kv_budget.py, and on /metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

# Capacity grows in steps of this many tokens (and the plan rounds up to it): fewer reallocations
# than one token at a time, and at most this much room unused per row.
STEP = 256


def token_bytes(config, dtype_size: int) -> int:
    """One token's keys and values over all layers, in bytes, for a Hugging Face config
    (GPT-2's names are mapped by transformers' `attribute_map`)."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers * 2 * kv_heads * head_dim * dtype_size


def _round_up(tokens: int) -> int:
    return -(-tokens // STEP) * STEP


@dataclass(frozen=True)
class Reading:
    """A prompt being read: the rows its own KV holds (one, and a copy per reply when it has
    several) and its length."""

    rows: int
    tokens: int


@dataclass(frozen=True)
class KvBudget:
    limit: int  # bytes, all the keys and values together
    token_bytes: int  # one token's, over all layers
    max_rows: int  # engine.max_running: the batch never has more rows
    tensors: int = 1  # the batch's keys and values are this many tensors (two per layer), reallocated one by one

    @property
    def tokens(self) -> int:
        """The budget in this model's tokens."""
        return self.limit // self.token_bytes

    def batch_rows(self, replies: int) -> int:
        """The rows a batch of `replies` allocates: the next power of two, at most `max_rows`."""
        rows = 1
        while rows < replies:
            rows *= 2
        return min(rows, max(self.max_rows, replies)) if replies else 0

    def batch_bytes(self, rows: int, tokens: int) -> int:
        """A batch of `rows` allocated rows with room for `tokens` tokens each."""
        return rows * _round_up(tokens) * self.token_bytes

    def plan(self, ends: list[int], reading: list[Reading], allocated: tuple[int, int] = (0, 0)) -> int:
        """The bytes the rows may reach: a batch holding replies that end at `ends` tokens (the
        running ones, the prompts being read, and any being admitted), grown from `allocated`
        ([rows, capacity] it has now, which it keeps until it shrinks), plus the prompts being
        read in KVs of their own."""
        rows = max(self.batch_rows(len(ends)), allocated[0])
        capacity = max(max(ends, default=0), allocated[1])
        batch = self.batch_bytes(rows, capacity) if rows else 0
        return batch + -(-batch // self.tensors) + self.reading_bytes(reading)

    def reading_bytes(self, reading: list[Reading]) -> int:
        # Prompts read together share one KV as wide as the longest of them: count each at that.
        longest = max((r.tokens for r in reading), default=0)
        return sum(r.rows for r in reading) * longest * self.token_bytes

    def longest_alone(self, prompt_tokens: int, replies: int = 1) -> int:
        """The most tokens (prompt and reply) a request of `replies` replies to a prompt of
        `prompt_tokens` may reach with nothing else in the budget: its batch rows, and its
        prompt's own KV while it is read."""
        reading = self.reading_bytes([reading_of(prompt_tokens, replies)])
        per_row = (self.limit - reading) * self.tensors // ((self.tensors + 1) * self.batch_rows(replies) * self.token_bytes)
        return per_row // STEP * STEP

    def context_tokens(self) -> int:
        """The longest conversation (prompt and reply) one request can hold within the budget."""
        # The most tokens T such that a prompt of T - 1 leaves room for one more: a search, since
        # the room left falls as the prompt grows (its own KV while it is read).
        low, high = 0, self.tokens
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.longest_alone(middle - 1) >= middle else (low, middle - 1)
        return low


def reading_of(prompt_tokens: int, replies: int) -> Reading:
    """What a prompt with `replies` replies holds while it is read: its row, and when it has
    several replies, a copy for each (`Rows.take`) before they join the batch."""
    return Reading(1 + (replies if replies > 1 else 0), prompt_tokens)
