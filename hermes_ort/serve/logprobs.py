"""Token log-probabilities on OpenAI's wire: chat's `logprobs.content` entries and text completions' legacy
`tokens / token_logprobs / top_logprobs / text_offset` lists."""
from __future__ import annotations

from ..generation.tokenizer import Tokenizer
from .scheduler import TokenLogprob


class LogprobWire:
    """Entries of one reply, shaped for chat or text completions; `start` is the text offset they follow."""

    def __init__(self, tokenizer: Tokenizer | None, chat: bool):
        self.tokenizer, self.chat, self.offset = tokenizer, chat, 0

    def piece(self, token: int) -> str:
        """A token's own text (vLLM's `token_id:N` where the directory has no tokenizer)."""
        if self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def __call__(self, entries: list[TokenLogprob]) -> dict:
        return self._chat(entries) if self.chat else self._text(entries)

    def _chat(self, entries: list[TokenLogprob]) -> dict:
        def one(token: int, logprob: float) -> dict:
            text = self.piece(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def _text(self, entries: list[TokenLogprob]) -> dict:
        tokens = [self.piece(e.token) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [self._rivals(e) for e in entries], "text_offset": offsets}

    def _rivals(self, entry: TokenLogprob) -> dict[str, float]:
        """Keyed by text, as OpenAI's legacy format is: of tokens with the same text the likeliest stays."""
        rivals: dict[str, float] = {}
        for token, logprob in entry.top:
            rivals.setdefault(self.piece(token), logprob)
        return rivals
