"""Turning a request's generated tokens into text, piece by piece, with stop sequences.

Each step decodes the whole continuation again (a tokenizer's decode is not additive: one token
can be half of a UTF-8 character, and spaces depend on neighbours) and hands out only what is new
and final: nothing that ends in an incomplete character, and nothing that could still turn out to
be the start of a stop sequence. The pieces handed out add up to the final text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TextStream:
    """The text of one request's continuation so far (tokens without the end-of-sequence token)."""

    tokenizer: Any
    stop: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    """The text handed out so far (final: it never changes)."""
    stopped: bool = False
    """A stop sequence was reached: `text` ends just before it."""

    def push(self, token: int) -> str:
        """Add one generated token; returns the new final text (possibly empty)."""
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return ""
        if self.stop:
            start = max(0, len(self.text) - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._advance(full[: min(hits)])
            return self._advance(full[: len(full) - _held_back(full, self.stop)])
        return self._advance(full)

    def finish(self) -> str:
        """The rest of the text once generation ended without a stop sequence."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._advance(full)

    def _advance(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins some stop sequence."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
