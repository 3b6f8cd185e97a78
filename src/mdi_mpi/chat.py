"""Chat answers: how a family's chat template marks reasoning and tool calls (``ChatFormat``), the
reading of one answer as its tokens come (``Answer``: reasoning, content and calls), and the grammar
that makes an answer a valid call (``ChatFormat.call_grammar``).

The tool-call formats, told apart by the tokenizer's vocabulary and chat template:

- ``hermes`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one or more, after some text or none;
- ``llama3`` (Llama 3.1 and later): the whole answer is ``{"name": ..., "parameters": {...}}``, after
  ``<|python_tag|>`` or not;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
- ``harmony`` (gpt-oss): a message on the commentary channel addressed ``to=functions.NAME``, whose
  text is the arguments; the analysis channel is the reasoning, the final channel the content.

Reasoning between ``<think>`` and ``</think>`` (Qwen3, and templates that open it in the prompt) is
kept out of the content too.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

from mdi_mpi.grammar import lark_json

THINK = ("<think>", "</think>")
HERMES = ("<tool_call>", "</tool_call>")
HARMONY_MARKS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")
RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")


def call_id(short: bool = False) -> str:
    """A new call's id: OpenAI's ``call_`` and 24 hex digits, or 9 letters and digits (``short``),
    which Mistral's templates insist on."""
    if short:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=call_id)

    def to_openai(self) -> dict:
        """OpenAI's tool-call object."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Delta:
    """What one token adds to an answer: content, reasoning, and the calls it completes."""

    content: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def __iadd__(self, other: Delta) -> Delta:
        self.content += other.content
        self.reasoning += other.reasoning
        self.calls += other.calls
        return self


def _call(obj: object, arguments_key: str, short_id: bool = False) -> ToolCall | None:
    """The call in a parsed JSON object ``{"name": ..., arguments_key: {...}}``, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("arguments", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
                    call_id(short_id))


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


class ChatFormat:
    """How one tokenizer's chat answers mark reasoning and tool calls."""

    def __init__(self, tools: str | None, think: bool, marks: dict[str, int], tokenizer=None):
        self.tools = tools  # hermes, llama3, mistral, harmony, or None: the template takes no tools
        self.think = think  # <think> ... </think> marks reasoning
        self.marks = marks  # special tokens that carry meaning: name -> id
        self.tokenizer = tokenizer  # harmony decodes its headers

    @classmethod
    def of(cls, tokenizer) -> ChatFormat:
        """The format of ``tokenizer``'s chat template."""
        template = tokenizer.chat_template or ""
        if isinstance(template, dict):  # several named templates
            template = template.get("default") or next(iter(template.values()), "")
        vocab = tokenizer.get_vocab()
        marks = {m: vocab[m] for m in (*HARMONY_MARKS, "<|constrain|>", "[TOOL_CALLS]", "<|python_tag|>", *HERMES)
                 if m in vocab}
        if all(m in marks for m in HARMONY_MARKS):
            tools = "harmony"
        elif "[TOOL_CALLS]" in marks:
            tools = "mistral"
        elif HERMES[0] in template:
            tools = "hermes"
        elif "<|python_tag|>" in marks and "tools" in template:
            tools = "llama3"
        else:
            tools = None
        return cls(tools, THINK[1] in template or THINK[0] in vocab, marks, tokenizer)

    def answer(self, tools: bool, thinking: bool = False) -> Answer:
        """A reader of one answer; ``tools``: calls are parsed out of it; ``thinking``: the prompt
        opened a ``<think>`` block, so the answer starts in its reasoning."""
        if self.tools == "harmony":
            return HarmonyAnswer(self, tools)
        return TextAnswer(self, tools, thinking)

    def call_grammar(self, tools: list[dict], name: str | None, parallel: bool) -> str:
        """The Lark grammar of an answer that is a call of one of ``tools`` (OpenAI's function tools),
        or of the one called ``name``; ``parallel``: one or more calls where the format allows it."""
        functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
        if self.tools is None:
            raise ValueError("this model's chat template takes no tools")
        if self.tools == "harmony":
            ids = self.marks
            alternatives = [
                f"<[{ids['<|channel|>']}]> {json.dumps('commentary to=functions.' + f['name'] + ' ')} "
                f"<[{ids['<|constrain|>']}]> \"json\" <[{ids['<|message|>']}]> {lark_json(_parameters(f))} "
                f"<[{ids['<|call|>']}]>" for f in functions]
            return "start: " + " | ".join(f"({a})" for a in alternatives)
        key = "parameters" if self.tools == "llama3" else "arguments"
        calls = {"oneOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, key: _parameters(f)},
                            "required": ["name", key], "additionalProperties": False} for f in functions]}
        if self.tools == "llama3":
            return f"start: {lark_json(calls)}"
        if self.tools == "mistral":
            array = {"type": "array", "items": calls, "minItems": 1, **({} if parallel else {"maxItems": 1})}
            return f"start: <[{self.marks['[TOOL_CALLS]']}]> {lark_json(array)}"
        call = f"<[{self.marks[HERMES[0]]}]> \"\\n\" {lark_json(calls)} \"\\n\" <[{self.marks[HERMES[1]]}]>"
        more = ' ("\\n" call)*' if parallel else ""
        return f"start: call{more}\ncall: {call}"


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object"}


class Answer:
    """One answer's reader: ``mark`` takes each token first (a Delta when it is a mark, consumed,
    None when its text is to be decoded), ``text`` each decoded piece, ``end`` flushes."""

    def mark(self, token: int) -> Delta | None:
        raise NotImplementedError

    def text(self, piece: str) -> Delta:
        raise NotImplementedError

    def end(self) -> Delta:
        raise NotImplementedError


class TextAnswer(Answer):
    """An answer whose reasoning and calls are marked in its text (hermes, llama3, mistral)."""

    def __init__(self, fmt: ChatFormat, tools: bool, thinking: bool):
        self.fmt = fmt
        self.tools = tools and fmt.tools is not None
        self.state = "reasoning" if thinking and fmt.think else "content"  # or call, json (held whole)
        self.pending = ""  # text not yet sorted
        self.started = False  # content has been shown
        self.trim = self.state == "reasoning"  # strip the newlines that follow <think> or </think>
        self.ids = {fmt.marks.get(m) for m in ("[TOOL_CALLS]", "<|python_tag|>")} - {None}

    def _opens(self) -> dict[str, str]:
        opens = {THINK[0]: "reasoning"} if self.fmt.think and not self.started else {}
        if self.tools and self.fmt.tools == "hermes":
            opens[HERMES[0]] = "call"
        return opens

    def mark(self, token: int) -> Delta | None:
        if token not in self.ids or not self.tools:
            return None
        out = self._flush_content()
        self.state = "json"  # [TOOL_CALLS] or <|python_tag|>: the rest is the calls
        return out

    def _flush_content(self) -> Delta:
        text, self.pending = self.pending, ""
        return self._content(text)

    def _content(self, text: str) -> Delta:
        text = self._trimmed(text)
        self.started = self.started or bool(text.strip())
        return Delta(content=text)

    def _trimmed(self, text: str) -> str:
        """``text`` without the newlines that follow <think> or </think>."""
        if self.trim:
            text = text.lstrip("\n")
            self.trim = not text
        return text

    def text(self, piece: str) -> Delta:
        self.pending += piece
        out = Delta()
        while True:
            if self.state == "content":
                if (self.tools and self.fmt.tools == "llama3" and not self.started
                        and self.pending.lstrip().startswith("{")):
                    self.state = "json"
                    return out
                opens = self._opens()
                hits = [(self.pending.find(tag), tag) for tag in opens if tag in self.pending]
                if not hits:
                    keep = _partial(self.pending, opens)
                    if self.fmt.tools == "llama3" and self.tools and not self.started and not self.pending.strip():
                        keep = len(self.pending)  # leading blanks: a JSON call may follow
                    out += self._content(self.pending[: len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep:]
                    return out
                at, tag = min(hits)
                out += self._content(self.pending[:at])
                self.pending, self.state, self.trim = self.pending[at + len(tag):], opens[tag], opens[tag] == "reasoning"
            elif self.state == "reasoning":
                at = self.pending.find(THINK[1])
                if at < 0:
                    keep = _partial(self.pending, [THINK[1]])
                    out.reasoning += self._trimmed(self.pending[: len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep:]
                    return out
                out.reasoning += self._trimmed(self.pending[:at])
                self.pending, self.state, self.trim = self.pending[at + len(THINK[1]):], "content", True
            elif self.state == "call":
                at = self.pending.find(HERMES[1])
                if at < 0:
                    return out
                body, self.pending = self.pending[:at], self.pending[at + len(HERMES[1]):]
                call = _call(_json(body.strip()), "arguments")
                if call is None:
                    out += self._content(HERMES[0] + body + HERMES[1])
                else:
                    out.calls.append(call)
                self.state = "content"
            else:  # json: held to the end
                return out

    def end(self) -> Delta:
        text, self.pending = self.pending, ""
        if self.state == "reasoning":
            return Delta(reasoning=self._trimmed(text))
        if self.state == "call":
            call = _call(_json(text.strip()), "arguments")
            return Delta(calls=[call]) if call else self._content(HERMES[0] + text)
        if self.state == "json":
            return self._calls(text)
        return self._content(text)

    def _calls(self, text: str) -> Delta:
        """The calls in held JSON text: an object (llama3, maybe several joined by ';') or an array
        (mistral); the text as content when it holds none."""
        obj = _json(text.strip())
        if obj is None and ";" in text:
            obj = [_json(part) for part in text.split(";")]
        objs = obj if isinstance(obj, list) else [obj]
        calls = [_call(o, "parameters" if self.fmt.tools == "llama3" else "arguments", self.fmt.tools == "mistral")
                 for o in objs]
        if not calls or None in calls:
            return self._content(text)
        return Delta(calls=calls)


def _partial(text: str, tags) -> int:
    """The length of the longest tail of ``text`` that begins one of ``tags`` (held back)."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


class HarmonyAnswer(Answer):
    """A gpt-oss answer: messages on channels, each after a header (``<|start|>assistant``, the
    prompt's last tokens, ``<|channel|>NAME``, maybe ``to=functions.F`` and ``<|constrain|>json``)."""

    def __init__(self, fmt: ChatFormat, tools: bool):
        self.fmt = fmt
        self.tools = tools
        m = fmt.marks
        self.start, self.message = m["<|start|>"], m["<|message|>"]
        self.ends = {m["<|end|>"], m["<|return|>"], m["<|call|>"]}
        self.in_message = False
        self.header: list[int] = []  # the current header's tokens
        self.route = "hidden"  # where the current message's text goes: content, reasoning, call, hidden
        self.callee = ""
        self.args = ""

    def mark(self, token: int) -> Delta | None:
        if self.in_message:
            if token not in self.ends:
                return None
            self.in_message, self.header = False, []
            if self.route == "call":
                return Delta(calls=[ToolCall(self.callee, self.args)])
            return Delta()
        if token == self.start:
            self.header = []
        elif token == self.message:
            self.in_message, self.args = True, ""
            self.route = self._route(self.fmt.tokenizer.decode(self.header))
        else:
            self.header.append(token)
        return Delta()

    def _route(self, header: str) -> str:
        channel = header.split("<|channel|>", 1)[1].split() if "<|channel|>" in header else []
        callee = RECIPIENT.search(header)
        if callee is not None:
            self.callee = callee.group(1)
            return "call" if self.tools else "hidden"
        name = channel[0] if channel else ""
        return {"final": "content", "analysis": "reasoning", "commentary": "content"}.get(name, "hidden")

    def text(self, piece: str) -> Delta:
        if self.route == "call":
            self.args += piece
            return Delta()
        if self.route == "content":
            return Delta(content=piece)
        if self.route == "reasoning":
            return Delta(reasoning=piece)
        return Delta()

    def end(self) -> Delta:
        if self.in_message and self.route == "call":  # cut off before <|call|>
            return Delta(content="")
        return Delta()
