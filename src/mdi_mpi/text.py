"""The text of a generated sequence, decoded token by token, cut at its stop strings.

Each token's piece comes from the tokenizers library's ``DecodeStream``, so a sequence costs time in
proportion to its length, not its square. Text that might be the start of a stop string is held back
until the next pieces show whether it is, so a stream never shows a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from mdi_mpi.sampling import shown_length


class TextStream:
    """One sequence's generated text: ``push`` each token, then ``rest`` at the end."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        from tokenizers.decoders import DecodeStream

        self.backend = tokenizer.backend_tokenizer
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.stops = tuple(stops)
        self.reach = max((len(s) for s in self.stops), default=1)  # longest stop string
        self.text = ""  # all decoded text, cut at a stop string once one appears
        self.shown = 0  # characters of ``text`` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Decode one more token; returns the text it lets a stream show ('' while it is held
        back). After a stop string, ``stopped`` is set and the text ends before it."""
        piece = self.decoder.step(self.backend, token)  # None while a UTF-8 character is incomplete
        if not piece or self.stopped:
            return ""
        start = max(0, len(self.text) - self.reach + 1)  # where a stop string could begin
        self.text += piece
        tail = self.text[start:]
        cut = start + shown_length(tail, self.stops)
        hits = [tail.find(s) for s in self.stops if s in tail]
        if hits:
            self.text, self.stopped = self.text[: start + min(hits)], True
        return self._show(cut)

    def rest(self) -> str:
        """The text still held back, shown once the sequence has ended."""
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        out = self.text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return out
