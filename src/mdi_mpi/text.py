"""The text of a generated sequence, decoded token by token, cut at its stop strings.

Each token's piece comes from the tokenizers library's ``DecodeStream``, so a sequence costs time in
proportion to its length, not its square. Text that might be the start of a stop string is held back
until the next pieces show whether it is, so a stream never shows a stop string.

A chat answer in gpt-oss's harmony format (``<|channel|>analysis<|message|>...<|end|><|start|>
assistant<|channel|>final<|message|>...<|return|>``) shows only its final channel (``Harmony``).
"""

from __future__ import annotations

from collections.abc import Sequence

from mdi_mpi.sampling import shown_length


class TextStream:
    """One sequence's generated text: ``push`` each token, then ``rest`` at the end."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), harmony: Harmony | None = None):
        from tokenizers.decoders import DecodeStream

        self.backend = tokenizer.backend_tokenizer
        self.channels = None if harmony is None else harmony.reader()
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.stops = tuple(stops)
        self.reach = max((len(s) for s in self.stops), default=1)  # longest stop string
        self.text = ""  # all decoded text, cut at a stop string once one appears
        self.shown = 0  # characters of ``text`` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Decode one more token; returns the text it lets a stream show ('' while it is held
        back). After a stop string, ``stopped`` is set and the text ends before it."""
        if self.channels is not None and not self.channels.shows(token):
            return ""
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


class Harmony:
    """The special tokens of gpt-oss's harmony format, where a tokenizer has them."""

    MARKS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")

    def __init__(self, tokenizer, ids: dict[str, int]):
        self.tokenizer = tokenizer
        self.start, self.channel, self.message = ids["<|start|>"], ids["<|channel|>"], ids["<|message|>"]
        self.ends = {ids["<|end|>"], ids["<|return|>"], ids["<|call|>"]}

    @classmethod
    def of(cls, tokenizer) -> Harmony | None:
        """The harmony marks of ``tokenizer``, or None when it lacks any of them (not gpt-oss)."""
        vocab = tokenizer.get_vocab()
        if not all(m in vocab for m in cls.MARKS):
            return None
        return cls(tokenizer, {m: vocab[m] for m in cls.MARKS})

    def reader(self) -> HarmonyReader:
        """A reader of one answer's tokens (the prompt ends with ``<|start|>assistant``)."""
        return HarmonyReader(self)


class HarmonyReader:
    """Routes one answer's tokens: ``shows`` is true for the tokens of a final-channel message."""

    def __init__(self, marks: Harmony):
        self.marks = marks
        self.state = "header"  # header (role and channel), message, or between messages
        self.header: list[int] = []  # the current header's tokens after <|channel|>
        self.final = False  # whether the current message is on the final channel

    def shows(self, token: int) -> bool:
        m = self.marks
        if self.state == "message":
            if token in m.ends:
                self.state, self.final = "between", False
                return False
            return self.final
        if token == m.start:
            self.state, self.header = "header", []
        elif token == m.channel:
            self.header = []
        elif token == m.message:
            name = m.tokenizer.decode(self.header).strip()
            self.state, self.final = "message", name.split()[0] == "final" if name else False
        elif self.state == "header":
            self.header.append(token)
        return False
