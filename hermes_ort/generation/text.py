"""Each row's text as its tokens arrive (RowText), for hermes_ort.TextGenerator and hermes serve.

Streaming text decodes each row's growing sequence of new tokens and emits only what is stable: never
half a UTF-8 character (a byte-level token may end inside one: the decoder shows U+FFFD until the rest
arrives), never the start of a stop string that may still complete.
"""
from __future__ import annotations

from typing import Sequence

from .tokenizer import Tokenizer

INCOMPLETE = "\ufffd"


class RowText:
    """One row's new tokens and the text emitted so far; `add` returns the newly stable text."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.finished = False

    def add(self, token: int, eos: Sequence[int]) -> str:
        if self.finished:
            return ""
        if token in eos:
            return self.finish(self.tokenizer.decode(self.ids))
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            return self.finish(text[:cut])
        stable = len(text.rstrip(INCOMPLETE)) - self.held_for_stop(text.rstrip(INCOMPLETE))
        return self.emit(text[:max(stable, len(self.emitted))])

    def held_for_stop(self, text: str) -> int:
        """Length of the longest end of `text` that begins a stop string."""
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def finish(self, text: str) -> str:
        self.finished = True
        return self.emit(text.rstrip(INCOMPLETE) if len(text) > len(self.emitted) else self.emitted)

    def flush(self) -> str:
        """At the end: whatever was held back (an unfinished stop string is plain text after all)."""
        return "" if self.finished else self.finish(self.tokenizer.decode(self.ids))

    def emit(self, text: str) -> str:
        new, self.emitted = text[len(self.emitted):], text
        return new
