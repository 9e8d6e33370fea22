"""Structured output: a JSON schema turned into a grammar that says, before each token,
which tokens may come next (llguidance), so a reply parses and validates whatever the
model's size.

llguidance was chosen on measurement (docs/BENCHMARKS.md): it needs no other package,
builds its view of the default model's 49152-token vocabulary in about 0.35 s, and
computes a token mask in tens of microseconds, against tens of milliseconds for a step.
"""

from __future__ import annotations

import copy
import logging
import threading

import llguidance
import llguidance.hf
import numpy as np
import torch

from backend.engine.allocator import give_back_free_memory
from backend.engine.errors import InvalidSamplingError
from backend.engine.protocol import OutputSchema

log = logging.getLogger(__name__)

# The separators a model has seen most in JSON; no free whitespace, which a small model
# could otherwise spend its whole budget on.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Vocabulary:
    """The tokenizer as the grammar engine sees it: built once per model, by `build_soon`'s
    thread or on first use, whichever comes first."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self._args = (tokenizer, vocab_size, sorted(eos_token_ids))
        self._built: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self.started = False  # by build_soon
        self._thread: threading.Thread | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._built is None:
                tokenizer, vocab_size, eos = self._args
                self._built = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
            return self._built

    def build_soon(self) -> None:
        """Build it on a thread of its own now (once), so the first request with a schema or
        log-probabilities does not wait for the build (0.35 s on a quiet machine, 1.5 s on a
        loaded one). The engine calls this when it is idle: the build holds the GIL."""
        if self.started:
            return
        self.started = True

        def build():
            try:
                self.tokenizer
            except Exception as exc:  # noqa: BLE001 - raised again to the first request that needs it
                log.info("The grammar's view of the vocabulary could not be built: %s", exc)
            give_back_free_memory()  # the build's temporaries: about 50 MB of the default model's engine

        self._thread = threading.Thread(target=build, name="grammar-vocabulary", daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float) -> None:
        """Until `build_soon`'s thread, if any, has finished."""
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (its text may be half a character)."""
        return self.tokenizer.decode_bytes([token_id])

    def grammar(self, schema: OutputSchema) -> str:
        """The grammar for `schema`; raises InvalidSamplingError naming what cannot be enforced."""
        options = _JSON_STYLE | {"lenient": not schema.strict}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(_closed(schema.json_schema), overrides=options)
        except ValueError as exc:
            raise InvalidSamplingError(f"The JSON schema is not valid: {exc}.", schema.source) from None
        if problem := llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer):
            raise InvalidSamplingError(f"The JSON schema cannot be enforced: {problem}.", schema.source)
        return grammar


class Constraint:
    """One reply's place in its grammar: which tokens may come next, and whether it is done."""

    def __init__(self, vocabulary: Vocabulary, grammar: str):
        self._matcher = llguidance.LLMatcher(vocabulary.tokenizer, grammar)
        self._size = vocabulary.tokenizer.vocab_size

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` with every token the grammar forbids here set to -inf."""
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        width = min(self._size, logits.shape[-1])
        allowed[:width] = torch.from_numpy(bits[:width].astype(bool))
        return logits.float().masked_fill(~allowed, float("-inf"))

    def advance(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"The grammar refused token {token_id}: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The reply has reached the end of its grammar: only the end of sequence may follow."""
        return self._matcher.is_stopped()


def _closed(schema: dict) -> dict:
    """The schema with objects that list their properties closed to others unless they say
    otherwise: JSON Schema allows extra properties by default, and a model would fill them
    with inventions. Replies still validate against the schema as given."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema
