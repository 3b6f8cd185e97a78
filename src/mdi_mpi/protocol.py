"""The OpenAI wire protocol of ``mdi_mpi.api``: the request models, the response and stream chunk
shapes, and OpenAI's error body with the exception handlers that answer with it.

Only rank 0 imports this module, and so pydantic. A request is checked in two steps: its pydantic
model checks the JSON types and the API's own limits (unknown fields are ignored, as OpenAI's clients
send many), then ``sampling.to_sampling_params``, shared with ``generate``'s flags and JSONL prompts,
checks the sampling values (and the shapes of ``stop`` and ``logit_bias``). Either step's error is a
400 with OpenAI's error body.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from mdi_mpi.chat import ChatFormat
from mdi_mpi.requests import Prompt
from mdi_mpi.sampling import SamplingParams, to_sampling_params
from mdi_mpi.scheduler import Step

MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_N = 16  # choices per prompt
MAX_STOPS = 16
MAX_TOOLS = 128  # tools per request
TEMPLATE_OWN = ("messages", "conversation", "tools", "documents", "tokenize", "add_generation_prompt",
                "continue_final_message", "return_dict", "return_tensors", "chat_template", "tokenizer_kwargs")
DEFAULTS = SamplingParams(temperature=1.0)  # OpenAI's; the seed is drawn per request when none is given
REASONS = {"stop": "stop", "length": "length", "context": "length", "tool_calls": "tool_calls"}  # ours -> OpenAI's
DONE = "data: [DONE]\n\n"  # a stream's last event
KEEPALIVE = ": keep-alive\n\n"  # an SSE comment, which clients skip

# -- errors --------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        """OpenAI's error body."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error as an HTTP response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _invalid(error: ValidationError) -> APIError:
    """The first of pydantic's errors as a 400, its ``param`` the top-level field."""
    e = error.errors(include_url=False)[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
    if e["type"] == "value_error":
        text = str(e["ctx"]["error"])
    elif e["type"] == "missing":
        text = e["msg"]
    else:
        got = repr(e["input"])
        text = f"{e['msg']}, got {got if len(got) <= 80 else got[:77] + '...'}"
    return APIError(400, f"{where}: {text}" if where else text, param=str(e["loc"][0]) if e["loc"] else None)


async def _http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).response()


async def _api_error(request: HTTPRequest, exc: APIError) -> Response:
    return exc.response()


EXCEPTION_HANDLERS = {HTTPException: _http_error, APIError: _api_error}  # Starlette's exception_handlers

# -- requests ------------------------------------------------------------------------------------


def _text(content: Any) -> Any:
    """A message's content: None is empty, a list of text parts is joined."""
    if content is None:
        return ""
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise ValueError("only text content parts are supported")
        return "".join(parts)
    return content


def _prompts(prompt: Any) -> list[Prompt]:
    """/v1/completions' ``prompt``: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str):
        return [Prompt(None, prompt, None)]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return [Prompt(None, None, prompt)]
        if len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(Prompt(None, p, None))
            elif isinstance(p, list) and p and all(_is_int(t) for t in p):
                out.append(Prompt(None, None, p))
            else:
                break
        else:
            return out
    raise ValueError("must be a string, a list of strings, or token ids (a list of integers, or of lists)")


def _stops(stop: Any) -> Any:
    """At most ``MAX_STOPS`` stop strings; ``to_sampling_params`` checks the strings."""
    if isinstance(stop, list) and len(stop) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    return stop


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # strict: no "1" for 1, no true for 1


class FunctionCall(_Model):
    """The function of a call an assistant message made: its name and its arguments (JSON text)."""

    name: str
    arguments: str = "{}"


class ToolCallIn(_Model):
    """A tool call of an earlier assistant message, sent back by the client."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    """One message of a conversation: its role and its text; an assistant's tool calls, or the
    result of one (role ``tool``)."""

    role: str
    content: Annotated[str, BeforeValidator(_text)] = ""
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def for_template(self) -> dict:
        """The message as chat templates take it: a call's arguments as an object where they parse
        as one (templates render them with ``tojson``)."""
        out = self.model_dump(exclude_none=True, exclude={"tool_calls"})
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in self.tool_calls]
        return out


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


class FunctionDef(_Model):
    """A function the model may call: its name, what it does, and its parameters' JSON schema."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Model):
    """One of the ``tools`` of a chat request."""

    type: Literal["function"]
    function: FunctionDef


def _tool_choice(value: Any) -> Any:
    """``none``, ``auto``, ``required``, or ``{"type": "function", "function": {"name": ...}}``."""
    if value in (None, "none", "auto", "required"):
        return value
    if (isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict)
            and isinstance(value["function"].get("name"), str)):
        return value
    raise ValueError("must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")


class JSONSchema(_Model):
    """``response_format``'s ``json_schema``."""

    name: str = "response"
    description: str | None = None
    json_schema: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    """The shape the output must take: any text, a JSON object, or JSON that a schema allows."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    @field_validator("json_schema")
    @classmethod
    def _needs_schema(cls, value: JSONSchema | None, info: ValidationInfo) -> JSONSchema | None:
        if info.data.get("type") == "json_schema" and (value is None or value.json_schema is None):
            raise ValueError("type json_schema needs json_schema.schema")
        return value


def _template_kwargs(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("must be an object")
    taken = sorted(set(value) & set(TEMPLATE_OWN))
    if taken:
        raise ValueError(f"{', '.join(taken)} cannot be set here")
    return value


class StreamOptions(_Model):
    """How a stream is told."""

    include_usage: bool | None = None  # end with a usage chunk


class GenerationRequest(_Model):
    """What both endpoints take; a field sent as null keeps its default."""

    model: str | None = None  # checked against the served model before the rest (404)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: every token
    seed: int | None = None
    stop: Annotated[Any, PlainValidator(_stops)] = None  # a string or a list of strings
    ignore_eos: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None  # token id -> bias
    response_format: ResponseFormat | None = None

    chat: ClassVar[bool] = False  # the chat template applies

    def prompts(self) -> list[Prompt]:
        """The prompts, before tokenization."""
        raise NotImplementedError

    def max_new_tokens(self) -> int | None:
        """The tokens each choice may generate; None: up to the end of the context."""
        return self.max_tokens

    def n_logprobs(self) -> int | None:
        """How many top log-probabilities each token reports; None: no log-probabilities."""
        raise NotImplementedError

    def choices(self) -> int:
        """Choices per prompt."""
        return self.n or 1

    def calls_tools(self) -> bool:
        """Whether the template is given tools, and calls are read from the answer."""
        return False

    def grammar(self, fmt: ChatFormat) -> str | None:
        """The grammar every choice must follow (``fmt``: the model's chat format), or None; 400
        when it cannot be made."""
        from mdi_mpi.grammar import json_grammar

        f = self.response_format
        try:
            if f is None or f.type == "text":
                return None
            return json_grammar(f.json_schema.json_schema if f.type == "json_schema" else None)
        except ValueError as e:
            raise APIError(400, str(e), param="response_format") from None

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self) -> SamplingParams:
        """The sampling parameters every choice shares (a random seed when none is given); 400 when one is bad."""
        try:
            return to_sampling_params(
                DEFAULTS,
                max_new_tokens=self.max_new_tokens(),
                temperature=self.temperature,
                top_k=None if self.top_k is None else max(0, self.top_k),
                top_p=self.top_p,
                seed=secrets.randbits(63) if self.seed is None else self.seed,
                stop=self.stop,
                ignore_eos=self.ignore_eos,
                logprobs=self.n_logprobs(),
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                logit_bias=self.logit_bias,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None


class ChatCompletionRequest(GenerationRequest):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None  # needs logprobs
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Annotated[Any, PlainValidator(_tool_choice)] = None  # default: auto with tools, none without
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: Annotated[Any, PlainValidator(_template_kwargs)] = None

    chat: ClassVar[bool] = True

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(cls, choice: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if choice == "required" and not tools:
            raise ValueError("'required' needs tools")
        if isinstance(choice, dict) and choice["function"]["name"] not in {t.function.name for t in tools}:
            raise ValueError(f"names no tool of this request: {choice['function']['name']!r}")
        return choice

    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def grammar(self, fmt: ChatFormat) -> str | None:
        choice = self.tool_choice
        if choice != "required" and not isinstance(choice, dict):
            return super().grammar(fmt)
        if self.response_format is not None and self.response_format.type != "text":
            raise APIError(400, "give either a response_format or a tool_choice that forces a call, not both",
                           param="response_format")
        name = choice["function"]["name"] if isinstance(choice, dict) else None
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        try:
            return fmt.call_grammar(tools, name, name is None and self.parallel_tool_calls is not False)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice") from None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("needs 'logprobs': true")
        return top

    def prompts(self) -> list[Prompt]:
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.calls_tools() else None
        return [Prompt(None, None, None, messages=[m.for_template() for m in self.messages], tools=tools,
                       template_kwargs=self.chat_template_kwargs or {})]

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    """The body of ``POST /v1/completions``."""

    prompt: Annotated[list[Prompt], PlainValidator(_prompts)]
    logprobs: int | None = None

    def prompts(self) -> list[Prompt]:
        return self.prompt

    def n_logprobs(self) -> int | None:
        return self.logprobs


R = TypeVar("R", bound=GenerationRequest)


def parse_request(data: bytes, kind: type[R], model_name: str) -> R:
    """The request in a POST body: 400 unless it is a valid JSON object of ``kind``, 404 when it
    names another model than ``model_name``."""
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server has {model_name!r}",
                       param="model", code="model_not_found")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        raise _invalid(e) from None

# -- responses -----------------------------------------------------------------------------------


def _logprobs(steps: list[tuple[Step, str]], tokenizer, chat: bool) -> dict:
    """OpenAI's logprobs object of a choice's (step, token text) pairs: chat's or completions' shape."""
    tops = [[(tokenizer.decode([i]), lp) for i, lp in step.top] for step, _ in steps]
    if chat:
        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(text, step.logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}
                            for (step, text), top in zip(steps, tops)]}
    return {"tokens": [text for _, text in steps], "token_logprobs": [step.logprob for step, _ in steps],
            "top_logprobs": [dict(top) for top in tops], "text_offset": []}


class _Response:
    """What the body and the chunks of one call share."""

    def __init__(self, ident: str, model: str, chat: bool, prompt_tokens: int, tokenizer):
        self.meta = {"id": ident, "created": int(time.time()), "model": model}
        self.chat, self.prompt_tokens, self.tokenizer = chat, prompt_tokens, tokenizer
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens found in the prefix cache (the most any choice found)

    def usage(self) -> dict:
        """OpenAI's usage object, so far."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def _ended(self, cached: int) -> None:
        self.cached_tokens = max(self.cached_tokens, cached)

    def _pair(self, step: Step) -> tuple[Step, str]:
        return step, self.tokenizer.decode([step.token])


class _Choice:
    """One choice of a non-streaming call, as its tokens come."""

    def __init__(self):
        self.text = ""
        self.reasoning = ""
        self.calls: list[dict] = []  # OpenAI's tool-call objects
        self.logprobs: list[tuple[Step, str]] = []  # (step, token text)
        self.finish_reason: str | None = None


class Completion(_Response):
    """A non-streaming call's body, built as its choices' tokens come."""

    def __init__(self, ident: str, model: str, chat: bool, prompt_tokens: int, tokenizer, indices: list[int]):
        super().__init__(ident, model, chat, prompt_tokens, tokenizer)
        self.choices = {i: _Choice() for i in indices}

    def token(self, step: Step) -> None:
        """A choice's next token."""
        choice = self.choices[step.request.index]
        choice.text += step.text
        choice.reasoning += step.reasoning
        choice.calls += [c.to_openai() for c in step.calls]
        if step.logprob is not None:
            choice.logprobs.append(self._pair(step))
        self.completion_tokens += 1

    def finish(self, index: int, reason: str, cached: int) -> None:
        """A choice has ended, for ``reason`` (ours, mapped to OpenAI's), having found ``cached``
        prompt tokens in the cache."""
        self._ended(cached)
        self.choices[index].finish_reason = REASONS[reason]

    def body(self) -> dict:
        """The response body, once every choice has ended."""
        choices = []
        for index, c in sorted(self.choices.items()):
            logprobs = _logprobs(c.logprobs, self.tokenizer, self.chat) if c.logprobs else None
            said = {"message": _message(c.text, c.reasoning, c.calls)} if self.chat else {"text": c.text}
            choices.append({"index": index, **said, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {**self.meta, "object": "chat.completion" if self.chat else "text_completion", "choices": choices,
                "usage": self.usage()}


def _message(text: str, reasoning: str, calls: list[dict]) -> dict:
    """A chat choice's message: its content (null when it is only calls), reasoning and calls."""
    message = {"role": "assistant", "content": None if calls and not text else text}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


class Chunks(_Response):
    """A streaming call's server-sent events, as OpenAI's clients expect."""

    def __init__(self, ident: str, model: str, chat: bool, prompt_tokens: int, tokenizer, include_usage: bool):
        super().__init__(ident, model, chat, prompt_tokens, tokenizer)
        self.include_usage = include_usage  # every chunk has "usage": null, and a usage chunk comes last
        self.calls: dict[int, int] = {}  # choice -> tool calls streamed so far

    def roles(self, indices: list[int]) -> str:
        """Chat's first chunk: each choice's role."""
        return self._event([self._choice(i, "", role=True) for i in indices])

    def token(self, step: Step) -> str | None:
        """A choice's next token (None when it has neither text nor log-probabilities to show yet)."""
        self.completion_tokens += 1
        lp = None if step.logprob is None else _logprobs([self._pair(step)], self.tokenizer, self.chat)
        if not (step.text or step.reasoning or step.calls) and lp is None:
            return None
        choice = self._choice(step.request.index, step.text, lp)
        if self.chat and step.reasoning:
            choice["delta"]["reasoning_content"] = step.reasoning
        if self.chat and step.calls:
            first = self.calls.get(step.request.index, 0)
            self.calls[step.request.index] = first + len(step.calls)
            choice["delta"]["tool_calls"] = [{"index": first + i, **c.to_openai()} for i, c in enumerate(step.calls)]
        return self._event([choice])

    def finish(self, index: int, reason: str, cached: int) -> str:
        """A choice has ended, for ``reason`` (ours, mapped to OpenAI's), having found ``cached``
        prompt tokens in the cache."""
        self._ended(cached)
        return self._event([self._choice(index, "", finish=REASONS[reason])])

    def usage_chunk(self) -> str:
        """The last chunk when the client asked for usage."""
        return self._event([], usage=self.usage())

    @staticmethod
    def error(error: APIError) -> str:
        """An error in the middle of a stream."""
        return "data: " + json.dumps(error.body()) + "\n\n"

    def _event(self, choices: list[dict], **more) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        extra = {"usage": None} if self.include_usage else {}
        return "data: " + json.dumps({**self.meta, "object": kind, "choices": choices, **extra, **more}) + "\n\n"

    def _choice(self, index: int, text: str, logprobs: dict | None = None, finish: str | None = None,
                role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text or logprobs else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
