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
from typing import Annotated, Any, ClassVar, TypeVar

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

from mdi_mpi.requests import Prompt
from mdi_mpi.sampling import SamplingParams, to_sampling_params
from mdi_mpi.scheduler import Step

MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_N = 16  # choices per prompt
MAX_STOPS = 16
DEFAULTS = SamplingParams(temperature=1.0)  # OpenAI's; the seed is drawn per request when none is given
REASONS = {"stop": "stop", "length": "length", "context": "length"}  # ours -> OpenAI's finish_reason
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


class ChatMessage(_Model):
    """One message of a conversation: its role and its text."""

    role: str
    content: Annotated[str, BeforeValidator(_text)] = ""


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

    chat: ClassVar[bool] = True

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("needs 'logprobs': true")
        return top

    def prompts(self) -> list[Prompt]:
        return [Prompt(None, None, None, messages=[m.model_dump() for m in self.messages])]

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
            said = {"message": {"role": "assistant", "content": c.text}} if self.chat else {"text": c.text}
            choices.append({"index": index, **said, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {**self.meta, "object": "chat.completion" if self.chat else "text_completion", "choices": choices,
                "usage": self.usage()}


class Chunks(_Response):
    """A streaming call's server-sent events, as OpenAI's clients expect."""

    def __init__(self, ident: str, model: str, chat: bool, prompt_tokens: int, tokenizer, include_usage: bool):
        super().__init__(ident, model, chat, prompt_tokens, tokenizer)
        self.include_usage = include_usage  # every chunk has "usage": null, and a usage chunk comes last

    def roles(self, indices: list[int]) -> str:
        """Chat's first chunk: each choice's role."""
        return self._event([self._choice(i, "", role=True) for i in indices])

    def token(self, step: Step) -> str | None:
        """A choice's next token (None when it has neither text nor log-probabilities to show yet)."""
        self.completion_tokens += 1
        lp = None if step.logprob is None else _logprobs([self._pair(step)], self.tokenizer, self.chat)
        if not step.text and lp is None:
            return None
        return self._event([self._choice(step.request.index, step.text, lp)])

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
