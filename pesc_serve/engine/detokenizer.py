"""Incremental detokenization with stop strings that never leak into streamed text.

Tokens are decoded with the tokenizers library's ``DecodeStream`` (it handles UTF-8
characters split across tokens).  Text that could still turn out to be the start of a
stop string is held back until it is either confirmed as ordinary text or matched, so a
stop string split across several tokens never reaches the client.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

_PROMPT_CONTEXT_TOKENS = 6  # decode context so the first token keeps its leading space


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._backend = tokenizer._tokenizer if hasattr(tokenizer, "_tokenizer") else tokenizer
        self._stream = DecodeStream(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:], skip_special_tokens)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.text = ""
        self._sent = 0  # characters of ``text`` already handed out
        self._longest_stop = max((len(s) for s in stop), default=0)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a token's text; returns the stop string it completed, if any."""
        piece = self._stream.step(self._backend, token_id)
        if not piece:
            return None
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        if not self.stop or not check_stop:
            return None
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        return s

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        tail = self.text[-self._longest_stop :] if self._longest_stop else ""
        for n in range(min(len(tail), self._longest_stop - 1), 0, -1):
            suffix = tail[-n:]
            if any(s.startswith(suffix) for s in self.stop):
                return n
        return 0

    def pop_delta(self, finished: bool) -> str:
        """New text safe to send; on finish, everything left."""
        end = len(self.text) if finished else len(self.text) - self._held_back()
        if end <= self._sent:
            return ""
        delta = self.text[self._sent : end]
        self._sent = end
        return delta
