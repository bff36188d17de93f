"""Text from tokens as they arrive, without re-decoding the whole answer at every step."""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    """Feed token ids one at a time; each call returns the new text they complete ("" while a multi-byte
    character is still incomplete). Only a short window of recent tokens is decoded, so a step costs the
    same at token 10 and token 10000. `text` is everything emitted so far."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = self._read = 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self._prefix:self._read], skip_special_tokens=self.skip)
        after = self.tokenizer.decode(self.tokens[self._prefix:], skip_special_tokens=self.skip)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        delta = after[len(before):]
        self.text += delta
        self._prefix, self._read = self._read, len(self.tokens)
        return delta
