"""The OpenAI-compatible HTTP API of ``mdi_mpi.serve``: its routes and the bridge to the scheduler
(Starlette, run by uvicorn in its own thread). The wire shapes are ``mdi_mpi.protocol``'s, the
figures ``mdi_mpi.metrics``'.

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
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mdi_mpi.chat import ChatFormat
from mdi_mpi.errors import UserError
from mdi_mpi.grammar import Grammars
from mdi_mpi.metrics import Metrics, Ranks
from mdi_mpi.protocol import (
    DONE,
    EXCEPTION_HANDLERS,
    KEEPALIVE,
    APIError,
    ChatCompletionRequest,
    Chunks,
    Completion,
    CompletionRequest,
    GenerationRequest,
    parse_request,
)
from mdi_mpi.requests import Request, Result, build_requests
from mdi_mpi.scheduler import Inbox, Listener, Step

STATIC = Path(__file__).parent / "static"  # the chat page and the dashboard: plain HTML, CSS and JavaScript
MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused (413)
KEEPALIVE_S = 5.0  # an SSE comment this often while a stream has nothing to say (long prefills)
RECENT = 200  # times to first token kept for the status page's percentiles


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


class Bridge(Listener):
    """The scheduler's listener on rank 0's main thread: routes each sequence's events to its call."""

    def __init__(self, inbox: Inbox, metrics: Metrics):
        self.inbox = inbox
        self.metrics = metrics
        self.calls: dict[Request, Call] = {}  # written by the HTTP thread before submitting
        self.generated = 0  # tokens, since start
        self.finished_count = 0  # sequences, since start
        self.prompt_tokens = self.cached_tokens = 0  # of admitted sequences, since start
        self.ttfts: deque[float] = deque(maxlen=RECENT)  # the latest times to first token

    def admitted(self, request: Request, cached: int) -> None:
        self.inbox.left_queue()
        call = self.calls[request]
        call.admitted.add(request)
        self.metrics.prompt_tokens.inc(len(request.input_ids))
        self.metrics.cached_tokens.inc(cached)
        self.metrics.computed_tokens.inc(len(request.input_ids) - cached)
        self.prompt_tokens += len(request.input_ids)
        self.cached_tokens += cached

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
        self.chat_format: ChatFormat | None = None
        self.grammars: Grammars | None = None
        self.inbox: Inbox | None = None
        self.bridge: Bridge | None = None
        self.prometheus: Metrics | None = None
        self.ranks: Ranks | None = None
        self.running: Callable[[], int] | None = None  # sequences holding a slot
        self.ready = threading.Event()
        self.created = int(time.time())
        self.started = time.perf_counter()

    def open(self, settings: Settings, tokenizer, grammars: Grammars, inbox: Inbox, bridge: Bridge, metrics: Metrics,
             ranks: Ranks, running: Callable[[], int]) -> None:
        """Every rank has loaded: start answering."""
        self.settings, self.tokenizer, self.inbox, self.bridge = settings, tokenizer, inbox, bridge
        self.chat_format, self.grammars = ChatFormat.of(tokenizer), grammars
        self.prometheus, self.ranks, self.running = metrics, ranks, running
        self.ready.set()

    def app(self) -> Starlette:
        """The ASGI application."""
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
        return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)

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
            "prompt_tokens": b.prompt_tokens, "prompt_tokens_cached": b.cached_tokens,
            "ttft_p50_s": pct(0.5), "ttft_p95_s": pct(0.95), "ranks": self.ranks.view(),
        })

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._run(request, await self._parse(request, ChatCompletionRequest))

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._run(request, await self._parse(request, CompletionRequest))

    # -- the work ------------------------------------------------------------------------------

    async def _run(self, request: HTTPRequest, body: GenerationRequest) -> Response:
        """Tokenize and submit the choices, then answer with a stream or, once they end, a body."""
        s, n = self.settings, body.choices()
        try:
            requests = build_requests(body.prompts(), body.sampling_params(), self.tokenizer, s.vocab_size,
                                      s.max_seq_len, chat=body.chat, n_samples=n)
        except UserError as e:
            raise APIError(400, str(e)) from None
        grammar = body.grammar(self.chat_format)
        if grammar is not None:
            schema = body.response_format is not None and body.response_format.type != "text"
            try:
                self.grammars.check(grammar, "JSON schema" if schema else "tool parameters' schema")
            except ValueError as e:
                raise APIError(400, str(e), param="response_format" if schema else "tools") from None
        now = time.perf_counter()
        ident = f"{'chatcmpl' if body.chat else 'cmpl'}-{secrets.token_hex(12)}"
        for r in requests:
            r.id, r.arrival, r.grammar = f"{ident}-{r.index}", now, grammar
            if body.max_new_tokens() is None:  # up to the end of the context
                r.params = replace(r.params, max_new_tokens=s.max_seq_len - len(r.input_ids) + 1)
        call = Call(requests)
        for r in requests:
            self.bridge.calls[r] = call
        if not self.inbox.submit(requests):
            for r in requests:
                del self.bridge.calls[r]
            reason = "the server is shutting down" if not self.inbox.accepting else "too many requests are waiting"
            raise APIError(503, f"{reason}; retry later", "unavailable_error", headers={"Retry-After": "1"})
        prompt_tokens = sum(len(r.input_ids) for r in requests[::n])
        if body.stream:
            chunks = Chunks(ident, s.model_name, body.chat, prompt_tokens, self.tokenizer, body.include_usage())
            return StreamingResponse(self._stream(call, chunks), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        completion = Completion(ident, s.model_name, body.chat, prompt_tokens, self.tokenizer,
                                [r.index for r in requests])
        return await self._collect(request, call, completion)

    async def _collect(self, request: HTTPRequest, call: Call, completion: Completion) -> Response:
        """Wait for every choice; a client that goes away has its choices cancelled."""
        left = len(call.requests)
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
                    completion.token(event[1])
                    continue
                _, r, result = event
                if result.finish_reason == "cancelled":
                    raise APIError(503, "the server is shutting down", "unavailable_error")
                completion.finish(r.index, result.finish_reason, result.cached_tokens)
                left -= 1
        except asyncio.CancelledError:
            self.inbox.cancel(call.requests)
            raise
        finally:
            gone.cancel()
        return JSONResponse(completion.body())

    async def _stream(self, call: Call, chunks: Chunks) -> AsyncIterator[str]:
        """Server-sent events; a client that goes away (Starlette cancels this generator) has its
        choices cancelled."""
        left, finished = len(call.requests), False
        try:
            if chunks.chat:
                yield chunks.roles([r.index for r in call.requests])
            while left:
                try:
                    event = await asyncio.wait_for(call.events.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield KEEPALIVE
                    continue
                if event[0] == "fail":
                    yield chunks.error(APIError(500, event[1], "server_error"))
                    break
                if event[0] == "token":
                    chunk = chunks.token(event[1])
                    if chunk is not None:
                        yield chunk
                    continue
                _, r, result = event
                left -= 1
                if result.finish_reason == "cancelled":
                    yield chunks.error(APIError(503, "the server is shutting down", "unavailable_error"))
                    break
                yield chunks.finish(r.index, result.finish_reason, result.cached_tokens)
            else:
                finished = True
                if chunks.include_usage:
                    yield chunks.usage_chunk()
            yield DONE
        finally:
            if not finished:
                self.inbox.cancel(call.requests)

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

    async def _parse(self, request: HTTPRequest, kind: type[GenerationRequest]) -> GenerationRequest:
        """The checked body of a POST, read up to ``MAX_BODY_BYTES``."""
        self._check(request)
        too_large = APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise too_large
        return parse_request(bytes(data), kind, self.settings.model_name)


async def _disconnected(request: HTTPRequest) -> None:
    """Return when the client of a request whose body has been read goes away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
