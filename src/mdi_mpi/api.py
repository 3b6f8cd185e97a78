"""The OpenAI-compatible HTTP API of ``mdi_mpi.serve`` (Starlette, run by uvicorn in its own thread).

Only rank 0 imports this module. Its threads meet in three places:

- the HTTP thread tokenizes, validates and submits each request's choices to the ``Inbox``, which
  rank 0's main thread (torch and every MPI call) drains between pipeline steps;
- the main thread's ``Bridge`` (the scheduler's listener) hands tokens and results back to each
  call's asyncio queue with ``call_soon_threadsafe``;
- ``Metrics`` is read by the HTTP thread and written by both (prometheus_client is thread-safe).

A bad request is answered here, with OpenAI's error shape, and never reaches the other ranks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mdi_mpi.errors import UserError
from mdi_mpi.requests import Prompt, Request, Result, build_requests
from mdi_mpi.sampling import MAX_LOGPROBS, SamplingParams, parse_logit_bias
from mdi_mpi.scheduler import Inbox, Listener, Step
from mdi_mpi.trace import BUSY_KINDS, EVENT_KINDS

STATIC = Path(__file__).parent / "static"  # the chat page and the dashboard: plain HTML, CSS and JavaScript
MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused (413)
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_N = 16  # choices per prompt
MAX_STOPS = 16
KEEPALIVE_S = 5.0  # an SSE comment this often while a stream has nothing to say (long prefills)
RECENT = 200  # times to first token kept for the status page's percentiles
REASONS = {"stop": "stop", "length": "length", "context": "length"}  # ours -> OpenAI's finish_reason


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class Settings:
    """What the API needs to know of the job and the command line."""

    model_name: str
    max_seq_len: int
    vocab_size: int
    n_slots: int
    n_groups: int  # micro-batch groups round the ring


class Call:
    """One HTTP request's choices (scheduler requests) and the events the main thread sends back:
    ``("token", Step)``, ``("end", Request, Result)`` or ``("fail", message)``."""

    def __init__(self, requests: list[Request]):
        self.requests = requests
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.last_token: dict[Request, float] = {}  # main thread: when each choice's last token came
        self.admitted: set[Request] = set()  # main thread

    def put(self, event: tuple) -> None:
        """Hand an event to the HTTP thread (called from the main thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Ranks:
    """Each rank's place in the job (reported once at start-up) and its load (the stats the ranks
    carry round the ring in the headers of their messages, as rank 0 last saw them)."""

    def __init__(self, info: list[dict], stats):
        self.info = info  # per rank: rank, host, layers, weight_bytes, kv_cache_bytes
        self.stats = stats  # the ring's [rank, stat] array, written by the main thread

    def view(self) -> list[dict]:
        stats = self.stats.copy()
        busy = [EVENT_KINDS.index(k) for k in BUSY_KINDS]
        recv, send = EVENT_KINDS.index("recv-wait"), EVENT_KINDS.index("send")
        return [{**info, "busy_s": 1e-6 * float(st[busy].sum()), "waiting_s": 1e-6 * float(st[recv]),
                 "sending_s": 1e-6 * float(st[send]), "peak_rss_bytes": 1024 * int(st[len(EVENT_KINDS)])}
                for info, st in zip(self.info, stats)]


class Metrics:
    """The Prometheus metrics of ``/metrics``."""

    def __init__(self, running, waiting, ranks: Ranks):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("mdi_mpi_requests_running", "Sequences holding a slot (each choice counts)", registry=r).set_function(running)
        Gauge("mdi_mpi_requests_waiting", "Sequences waiting for a slot (each choice counts)", registry=r).set_function(waiting)
        self.prompt_tokens = Counter("mdi_mpi_prompt_tokens", "Prompt tokens of admitted sequences", registry=r)
        self.generated_tokens = Counter("mdi_mpi_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("mdi_mpi_request_finished", "Finished sequences", ["finish_reason"], registry=r)
        latency = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.ttft = Histogram("mdi_mpi_time_to_first_token_seconds", "From arrival (queueing included) to the first token",
                              buckets=latency, registry=r)
        self.itl = Histogram("mdi_mpi_inter_token_latency_seconds", "Between two tokens of a sequence",
                             buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5), registry=r)
        self.e2e = Histogram("mdi_mpi_e2e_request_latency_seconds", "From arrival to the last token", buckets=latency,
                             registry=r)
        r.register(_RankCollector(ranks))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _RankCollector:
    """Each rank's busy, waiting and sending seconds."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def collect(self):
        view = self.ranks.view()
        for what, doc in (("busy", "computing or sampling"), ("waiting", "waiting for a message"),
                          ("sending", "sending a message")):
            family = CounterMetricFamily(f"mdi_mpi_rank_{what}_seconds", f"Seconds each rank spent {doc}", labels=["rank"])
            for r in view:
                family.add_metric([str(r["rank"])], r[f"{what}_s"])
            yield family


class Bridge(Listener):
    """The scheduler's listener on rank 0's main thread: routes each sequence's events to its call."""

    def __init__(self, inbox: Inbox, metrics: Metrics):
        self.inbox = inbox
        self.metrics = metrics
        self.calls: dict[Request, Call] = {}  # written by the HTTP thread before submitting
        self.generated = 0  # tokens, since start
        self.finished_count = 0  # sequences, since start
        self.ttfts: deque[float] = deque(maxlen=RECENT)  # the latest times to first token

    def admitted(self, request: Request) -> None:
        self.inbox.left_queue()
        call = self.calls[request]
        call.admitted.add(request)
        self.metrics.prompt_tokens.inc(len(request.input_ids))

    def token(self, step: Step) -> None:
        call = self.calls[step.request]
        now = time.perf_counter()
        last = call.last_token.get(step.request)
        if last is None:
            self.metrics.ttft.observe(now - step.request.arrival)
            self.ttfts.append(now - step.request.arrival)
        else:
            self.metrics.itl.observe(now - last)
        call.last_token[step.request] = now
        self.metrics.generated_tokens.inc()
        self.generated += 1
        call.put(("token", step))

    def finished(self, request: Request, result: Result) -> None:
        call = self.calls.pop(request)
        if request not in call.admitted:  # cancelled while it waited
            self.inbox.left_queue()
        call.last_token.pop(request, None)
        call.admitted.discard(request)
        self.metrics.finished.labels(result.finish_reason).inc()
        self.finished_count += 1
        if result.finish_reason != "cancelled":
            self.metrics.e2e.observe(result.duration_s)
        call.put(("end", request, result))

    def fail_all(self, message: str) -> None:
        """Tell every call in flight that the job has failed (before it is aborted)."""
        for call in set(self.calls.values()):
            call.put(("fail", message))


class API:
    """The routes, and what they share once every rank has loaded: settings, the HTTP thread's own
    tokenizer, the inbox, the bridge and the metrics."""

    def __init__(self, api_key: str | None):
        self.api_key = api_key
        self.settings: Settings | None = None
        self.tokenizer = None
        self.inbox: Inbox | None = None
        self.bridge: Bridge | None = None
        self.prometheus: Metrics | None = None
        self.ranks: Ranks | None = None
        self.running = None  # () -> sequences holding a slot
        self.ready = threading.Event()
        self.created = int(time.time())
        self.started = time.perf_counter()

    def open(self, settings: Settings, tokenizer, inbox: Inbox, bridge: Bridge, metrics: Metrics, ranks: Ranks,
             running) -> None:
        """Every rank has loaded: start answering."""
        self.settings, self.tokenizer, self.inbox, self.bridge = settings, tokenizer, inbox, bridge
        self.prometheus, self.ranks, self.running = metrics, ranks, running
        self.ready.set()

    def app(self) -> Starlette:
        routes = [
            Route("/", self.page("chat.html")),
            Route("/dashboard", self.page("dashboard.html")),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
            Route("/health", self.health),
            Route("/metrics", self.metrics),
            Route("/v1/models", self.models),
            Route("/v1/status", self.status),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, APIError: _api_error})

    # -- routes --------------------------------------------------------------------------------

    @staticmethod
    def page(name: str):
        """A page of ``static/``: public, since it holds no data; what it fetches needs the key."""
        async def serve_page(request: HTTPRequest) -> Response:
            return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

        return serve_page

    async def health(self, request: HTTPRequest) -> Response:
        if not self.ready.is_set():
            return APIError(503, "the model is still loading", "unavailable_error").response()
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: HTTPRequest) -> Response:
        self._check(request)
        return Response(self.prometheus.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: HTTPRequest) -> Response:
        self._check(request)
        s = self.settings
        card = {"id": s.model_name, "object": "model", "created": self.created, "owned_by": "mdi-mpi",
                "max_model_len": s.max_seq_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def status(self, request: HTTPRequest) -> Response:
        """The dashboard's figures: running totals, which the page turns into rates."""
        self._check(request)
        s, b = self.settings, self.bridge
        ttfts = sorted(b.ttfts)

        def pct(q: float) -> float | None:
            return round(ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))], 4) if ttfts else None

        return JSONResponse({
            "model": s.model_name, "uptime_s": round(time.perf_counter() - self.started, 3),
            "slots": s.n_slots, "groups": s.n_groups, "max_seq_len": s.max_seq_len,
            "running": self.running(), "waiting": self.inbox.waiting,
            "generated_tokens": b.generated, "finished_requests": b.finished_count,
            "ttft_p50_s": pct(0.5), "ttft_p95_s": pct(0.95), "ranks": self.ranks.view(),
        })

    async def chat(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        prompts = [Prompt(None, None, None, messages=[_message(m, i) for i, m in enumerate(messages)])]
        top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
        if body.get("logprobs") not in (None, True, False):
            raise APIError(400, "'logprobs' must be a boolean", param="logprobs")
        logprobs = (top or 0) if body.get("logprobs") else None
        if top is not None and logprobs is None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        max_tokens = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1)
        return await self._run(request, body, prompts, max_tokens, logprobs, chat=True)

    async def completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        prompts = _prompts(body.get("prompt"))
        logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
        return await self._run(request, body, prompts, _int(body, "max_tokens", 1), logprobs, chat=False)

    # -- the work ------------------------------------------------------------------------------

    async def _run(self, request: HTTPRequest, body: dict, prompts: list[Prompt], max_tokens: int | None,
                   logprobs: int | None, chat: bool) -> Response:
        s = self.settings
        n = _int(body, "n", 1, MAX_N) or 1
        stream = _bool(body, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        usage_chunk = stream and bool(options.get("include_usage"))
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens or 1,
                temperature=_number(body, "temperature", 1.0),
                top_k=max(0, _int(body, "top_k", -1) or 0),
                top_p=_number(body, "top_p", 1.0),
                seed=_int(body, "seed", 0) if body.get("seed") is not None else secrets.randbits(63),
                stop=_stops(body.get("stop")),
                ignore_eos=_bool(body, "ignore_eos"),
                logprobs=logprobs,
                presence_penalty=_number(body, "presence_penalty", 0.0),
                frequency_penalty=_number(body, "frequency_penalty", 0.0),
                logit_bias=parse_logit_bias(body["logit_bias"]) if body.get("logit_bias") is not None else (),
            )
            requests = build_requests(prompts, params, self.tokenizer, s.vocab_size, s.max_seq_len, chat=chat, n_samples=n)
        except (ValueError, UserError) as e:
            raise APIError(400, str(e)) from None
        now = time.perf_counter()
        prefix = "chatcmpl" if chat else "cmpl"
        ident = f"{prefix}-{secrets.token_hex(12)}"
        for r in requests:
            r.id, r.arrival = f"{ident}-{r.index}", now
            if max_tokens is None:  # default: up to the end of the context
                r.params = replace(r.params, max_new_tokens=s.max_seq_len - len(r.input_ids) + 1)
        call = Call(requests)
        for r in requests:
            self.bridge.calls[r] = call
        if not self.inbox.submit(requests):
            for r in requests:
                del self.bridge.calls[r]
            reason = "the server is shutting down" if not self.inbox.accepting else "too many requests are waiting"
            raise APIError(503, f"{reason}; retry later", "unavailable_error", headers={"Retry-After": "1"})
        meta = {"id": ident, "created": int(time.time()), "model": s.model_name}
        prompt_tokens = sum(len(r.input_ids) for r in requests[::n])
        if stream:
            events = _stream(self, call, meta, chat, prompt_tokens, usage_chunk)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._collect(request, call, meta, chat, prompt_tokens)

    async def _collect(self, request: HTTPRequest, call: Call, meta: dict, chat: bool, prompt_tokens: int) -> Response:
        """Wait for every choice; a client that goes away has its choices cancelled."""
        choices = {r: _Choice(r.index) for r in call.requests}
        left = len(choices)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while left:
                get = asyncio.ensure_future(call.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    self.inbox.cancel(call.requests)
                    return Response(status_code=499)  # nobody reads it: the client has gone
                event = get.result()
                if event[0] == "fail":
                    raise APIError(500, event[1], "server_error")
                if event[0] == "token":
                    choices[event[1].request].add(event[1], self.tokenizer)
                else:
                    _, r, result = event
                    if result.finish_reason == "cancelled":
                        raise APIError(503, "the server is shutting down", "unavailable_error")
                    choices[r].finish_reason = REASONS[result.finish_reason]
                    left -= 1
        except asyncio.CancelledError:
            self.inbox.cancel(call.requests)
            raise
        finally:
            gone.cancel()
        done = sorted(choices.values(), key=lambda c: c.index)
        completion_tokens = sum(len(c.tokens) for c in done)
        body = {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [c.chat(self.tokenizer) if chat else c.completion(self.tokenizer) for c in done],
            "usage": _usage(prompt_tokens, completion_tokens),
        }
        return JSONResponse(body)

    # -- helpers -------------------------------------------------------------------------------

    def _check(self, request: HTTPRequest) -> None:
        """Refuse a request without the API key (401), or before every rank has loaded (503)."""
        key = self.api_key
        given = request.headers.get("authorization", "")
        if key is not None and not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", "authentication_error",
                           code="invalid_api_key")
        if not self.ready.is_set():
            raise APIError(503, "the model is still loading", "unavailable_error", headers={"Retry-After": "5"})

    async def _body(self, request: HTTPRequest) -> dict:
        """The checked JSON object of a POST."""
        self._check(request)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.settings.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server has {self.settings.model_name!r}",
                           param="model", code="model_not_found")
        return body


class _Choice:
    """One choice of a non-streaming call, as its tokens come."""

    def __init__(self, index: int):
        self.index = index
        self.tokens: list[int] = []
        self.text = ""
        self.logprobs: list[tuple[Step, str]] = []  # (step, token text)
        self.finish_reason: str | None = None

    def add(self, step: Step, tokenizer) -> None:
        self.tokens.append(step.token)
        self.text += step.text
        if step.logprob is not None:
            self.logprobs.append((step, tokenizer.decode([step.token])))

    def chat(self, tokenizer) -> dict:
        return {"index": self.index, "message": {"role": "assistant", "content": self.text},
                "logprobs": _chat_logprobs(self.logprobs, tokenizer) if self.logprobs else None,
                "finish_reason": self.finish_reason}

    def completion(self, tokenizer) -> dict:
        return {"index": self.index, "text": self.text,
                "logprobs": _completion_logprobs(self.logprobs, tokenizer) if self.logprobs else None,
                "finish_reason": self.finish_reason}


async def _stream(api: API, call: Call, meta: dict, chat: bool, prompt_tokens: int, usage_chunk: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI's clients expect; a client that goes away (Starlette cancels
    this generator) has its choices cancelled."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if usage_chunk else {}
    tokenizer = api.tokenizer

    def event(choices: list[dict], **more) -> str:
        return "data: " + json.dumps({**meta, "object": kind, "choices": choices, **extra, **more}) + "\n\n"

    def choice(index: int, text: str, logprobs=None, finish: str | None = None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text or logprobs else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    left, completion_tokens, finished = len(call.requests), 0, False
    try:
        if chat:
            yield event([choice(r.index, "", role=True) for r in call.requests])
        while left:
            try:
                item = await asyncio.wait_for(call.events.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if item[0] == "fail":
                yield "data: " + json.dumps(APIError(500, item[1], "server_error").body()) + "\n\n"
                break
            if item[0] == "token":
                step = item[1]
                completion_tokens += 1
                lp = None
                if step.logprob is not None:
                    pair = [(step, tokenizer.decode([step.token]))]
                    lp = _chat_logprobs(pair, tokenizer) if chat else _completion_logprobs(pair, tokenizer)
                if step.text or lp is not None:
                    yield event([choice(step.request.index, step.text, lp)])
                continue
            _, r, result = item
            left -= 1
            if result.finish_reason == "cancelled":
                yield "data: " + json.dumps(APIError(503, "the server is shutting down", "unavailable_error").body()) + "\n\n"
                break
            yield event([choice(r.index, "", finish=REASONS[result.finish_reason])])
        else:
            finished = True
            if usage_chunk:
                yield event([], usage=_usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            api.inbox.cancel(call.requests)


async def _disconnected(request: HTTPRequest) -> None:
    """Return when the client of a request whose body has been read goes away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chat_logprobs(steps: list[tuple[Step, str]], tokenizer) -> dict:
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(text, step.logprob), "top_logprobs": [entry(t, lp) for t, lp in _top(step, tokenizer)]}
                        for step, text in steps]}


def _completion_logprobs(steps: list[tuple[Step, str]], tokenizer) -> dict:
    return {
        "tokens": [text for _, text in steps],
        "token_logprobs": [step.logprob for step, _ in steps],
        "top_logprobs": [dict(_top(step, tokenizer)) for step, _ in steps],
        "text_offset": [],
    }


def _top(step: Step, tokenizer) -> list[tuple[str, float]]:
    return [(tokenizer.decode([i]), lp) for i, lp in step.top]


def _message(m, i: int) -> dict:
    """One chat message, checked; content given as a list of text parts is joined."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise APIError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
    content = m.get("content")
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
        content = "".join(parts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
    return {"role": m["role"], "content": content}


def _prompts(prompt) -> list[Prompt]:
    """/v1/completions' ``prompt``: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str):
        return [Prompt(None, prompt, None)]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return [Prompt(None, None, prompt)]
        if len(prompt) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
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
    raise APIError(400, "'prompt' must be a string, a list of strings, or token ids (a list of integers, or of lists)",
                   param="prompt")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(body: dict, key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise APIError(400, f"'{key}' must be an integer {bound}, got {value!r}", param=key)
    return value


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{key}' must be a number, got {value!r}", param=key)
    return float(value)


def _bool(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be a boolean, got {value!r}", param=key)
    return value


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", param="stop")
    return tuple(stops)


async def _http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).response()


async def _api_error(request: HTTPRequest, exc: APIError) -> Response:
    return exc.response()
