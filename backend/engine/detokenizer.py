"""Token ids in, text pieces out, one token at a time.

Decoding each token on its own breaks two things: a multi-byte character split
over several byte-level tokens comes out as U+FFFD, and SentencePiece-style
tokenizers drop the leading space of a word. So we decode a short window of
recent tokens and emit only what it adds to the text already emitted, holding
back while the window ends in an incomplete character, but never for more
than a character's worth of tokens: a model can emit bytes that never form
valid UTF-8, and those must come out (as U+FFFD) rather than stall the stream.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"
MAX_HELD_TOKENS = 4  # the longest UTF-8 character is 4 bytes


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        # _ids[_prefix:_read] is context already emitted; _ids[_read:] is pending.
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly empty)."""
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix : self._read])
        current = self._decode(self._ids[self._prefix :])
        incomplete = current.endswith(REPLACEMENT_CHAR) and len(self._ids) - self._read < MAX_HELD_TOKENS
        if incomplete or len(current) <= len(emitted):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return current[len(emitted) :]

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        current = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return current[len(emitted) :] if len(current) > len(emitted) else ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
