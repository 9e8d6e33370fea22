"""Stop strings: the reply ends before the first of them, which never reaches the client."""

from __future__ import annotations


def held_back(text: str, strings: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of one of `strings`
    (and so must wait for the next piece)."""
    return max((n for s in strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


class StopStrings:
    """Cuts the text before the first stop string.

    Text that could be the start of a stop string is held back until the next
    piece shows whether it is one.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(stops)
        self.held = ""
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def push(self, piece: str) -> tuple[str, bool]:
        """Returns the text that is safe to send, and whether a stop string was hit."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [(i, s) for i, s in ((text.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            at, self.matched = min(hits, key=lambda hit: hit[0])  # the first in the text; of two there, the first listed
            return text[:at], True
        keep = held_back(text, self.stops)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
