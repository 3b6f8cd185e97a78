"""The text of a generated sequence, decoded token by token, cut at its stop strings.

Each token's piece comes from the tokenizers library's ``DecodeStream``, so a sequence costs time in
proportion to its length, not its square. Text that might be the start of a stop string is held back
until the next pieces show whether it is, so a stream never shows a stop string.

A chat answer is read by its family's ``chat.Answer``, which sorts it into reasoning, content and
tool calls; stop strings apply to the content.
"""

from __future__ import annotations

from collections.abc import Sequence

from mdi_mpi.chat import Answer, Delta, ToolCall
from mdi_mpi.sampling import shown_length


class TextStream:
    """One sequence's generated text: ``push`` each token, then ``rest`` at the end. With a chat
    ``answer``, its reasoning and calls are kept apart from the text."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), answer: Answer | None = None):
        from tokenizers.decoders import DecodeStream

        self.backend = tokenizer.backend_tokenizer
        self.answer = answer
        self.reasoning = ""  # all reasoning so far
        self.calls: list[ToolCall] = []  # the tool calls so far
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.stops = tuple(stops)
        self.reach = max((len(s) for s in self.stops), default=1)  # longest stop string
        self.text = ""  # all decoded text, cut at a stop string once one appears
        self.shown = 0  # characters of ``text`` handed out
        self.stopped = False

    def push(self, token: int) -> Delta:
        """Decode one more token; returns what it lets a stream show: content ('' while it is held
        back), reasoning and finished calls. After a stop string, ``stopped`` is set and the text
        ends before it."""
        if self.answer is not None:
            marked = self.answer.mark(token)
            if marked is not None:
                return self._take(marked)
        piece = self.decoder.step(self.backend, token)  # None while a UTF-8 character is incomplete
        if not piece:
            return Delta()
        return self._take(self.answer.text(piece) if self.answer is not None else Delta(content=piece))

    def rest(self) -> Delta:
        """What is still held back, shown once the sequence has ended."""
        delta = self._take(self.answer.end()) if self.answer is not None and not self.stopped else Delta()
        delta.content += self._show(len(self.text))
        return delta

    def _take(self, delta: Delta) -> Delta:
        self.reasoning += delta.reasoning
        self.calls += delta.calls
        delta.content = self._content(delta.content) if delta.content else ""
        return delta

    def _content(self, piece: str) -> str:
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.reach + 1)  # where a stop string could begin
        self.text += piece
        tail = self.text[start:]
        cut = start + shown_length(tail, self.stops)
        hits = [tail.find(s) for s in self.stops if s in tail]
        if hits:
            self.text, self.stopped = self.text[: start + min(hits)], True
        return self._show(cut)

    def _show(self, end: int) -> str:
        out = self.text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return out
