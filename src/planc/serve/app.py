"""The HTTP layer (Starlette on uvicorn): OpenAI routes, streaming, errors, health and metrics.

Every request is checked against the plan before it is admitted: the served model's name, the
prompt's length plus max_tokens against workload.max_seq_len (400 naming the limit), then the
scheduler's slots and queue (429 with Retry-After). A request only gets its 200 (and, streaming,
its first event) once its first token exists, so a failure before that is an ordinary 500 and a
failure after it ends the stream with an error event. Whatever a request does, the others and the
server go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from planc.plan import Plan
from planc.serve import protocol
from planc.serve.engine import Emitted, Sampling
from planc.serve.metrics import Metrics
from planc.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request
from planc.serve.scheduler import Failed, Job, QueueFull, Scheduler
from planc.serve.text import GuardedTokenizer

log = logging.getLogger("planc.serve")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MIN_BODY_LIMIT = 1 << 20
BODY_BYTES_PER_TOKEN = 64  # generous: JSON-escaped text of one token, plus the chat messages' framing


@dataclass
class Served:
    """What the routes need: the plan, its model's name and tokenizer, the scheduler and metrics."""

    name: str
    plan: Plan
    tokenizer: GuardedTokenizer
    scheduler: Scheduler
    metrics: Metrics
    batching: str  # how decode steps run, for /health
    created: int

    @property
    def body_limit(self) -> int:
        return max(MIN_BODY_LIMIT, BODY_BYTES_PER_TOKEN * self.plan.workload.max_seq_len)


def build_app(served: Served) -> Starlette:
    """The ASGI app; its lifespan starts the decode worker and, at shutdown, lets it finish."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        served.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(served.scheduler.close)

    async def completions(request: Request) -> Response:
        return await _generate(request, served, "completions")

    async def chat(request: Request) -> Response:
        return await _generate(request, served, "chat")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(served)]})

    async def model(request: Request) -> Response:
        if request.path_params["name"] != served.name:
            raise _unknown_model(request.path_params["name"], served.name)
        return JSONResponse(_model_card(served))

    async def health(request: Request) -> Response:
        running, waiting = served.scheduler.counts()
        alive = served.scheduler.alive()
        body = {
            "status": "ok" if alive else "unhealthy: the decode worker stopped",
            "model": served.name,
            "plan_hash": served.plan.plan_hash,
            "batching": served.batching,
            "batch_size": served.scheduler.batch_size,
            "max_queue": served.scheduler.max_queue,
            "max_seq_len": served.plan.workload.max_seq_len,
            "in_flight": running,
            "queued": waiting,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    async def metrics(request: Request) -> Response:
        return Response(served.metrics.exposition(), media_type=served.metrics.content_type)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


def _model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "planc",
            "max_model_len": served.plan.workload.max_seq_len}


def _unknown_model(asked: str, served: str) -> APIError:
    return APIError(404, f"the model '{asked}' does not exist; this server serves '{served}'", param="model",
                    code="model_not_found")


# ---------------------------------------------------------------------- errors


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: APIError) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return _error_response(APIError(exc.status_code, message, type=kind, headers=dict(exc.headers or {})))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


# ---------------------------------------------------------------------- generating


@dataclass
class _Call:
    """One generation request as the route sees it."""

    endpoint: str  # "completions" | "chat"
    request: protocol._Sampling
    prompt_ids: list[int]
    job: Job
    rid: str
    started: float
    status: str = "499"  # a stream's outcome so far: 499 until it ends with [DONE] (200) or an error (500)


async def _generate(http: Request, served: Served, endpoint: str) -> Response:
    started = time.perf_counter()
    try:
        call = await _admit(http, served, endpoint, started)
    except ClientDisconnect:  # gone while sending its body: nobody to answer
        served.metrics.requests.labels(endpoint, "499").inc()
        return Response(status_code=499)
    except APIError as error:
        served.metrics.requests.labels(endpoint, str(error.status)).inc()
        if error.status == 429:
            served.metrics.rejected.inc()
        return _error_response(error)
    served.metrics.prompt_tokens.inc(len(call.prompt_ids))
    gone = asyncio.ensure_future(_disconnected(http))
    first = await _next(call.job, gone)
    if call.request.stream and isinstance(first, Emitted):
        gone.cancel()  # the streaming response watches the connection itself from here
        served.metrics.generated_tokens.inc()
        return _EventStream(_stream(call, served, first), lambda: _stream_closed(call, served))
    try:
        return await _collect(call, served, first, gone)
    finally:
        gone.cancel()


async def _admit(http: Request, served: Served, endpoint: str, started: float) -> _Call:
    """Parse, check against the plan, tokenize and queue; any refusal is an APIError."""
    body = await _read_body(http, served.body_limit)
    model = CompletionRequest if endpoint == "completions" else ChatCompletionRequest
    request = protocol.parse(model, body)
    if request.model != served.name:
        raise _unknown_model(request.model, served.name)
    stop = request.stop_strings()
    if endpoint == "completions":
        prompt = request.single_prompt()
        prompt_ids = await asyncio.to_thread(_encode_prompt, served.tokenizer, prompt)
        requested, default = request.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS
    else:
        messages = [message.for_template() for message in request.messages]
        prompt_ids = await asyncio.to_thread(_encode_chat, served.tokenizer, messages)
        requested, default = request.requested_max_tokens(), None
    max_new_tokens = token_budget(len(prompt_ids), requested, default, served.plan.workload.max_seq_len)
    sampling = Sampling(request.temperature, request.top_p, request.seed)
    job = Job(prompt_ids, max_new_tokens, sampling, stop, asyncio.get_running_loop(), stream=request.stream)
    try:
        served.scheduler.submit(job)
    except QueueFull as full:
        raise APIError(
            429,
            f"the server is at its plan's limit: {full}; retry after {full.retry_after} s",
            type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(full.retry_after)},
        ) from None
    prefix = "cmpl" if endpoint == "completions" else "chatcmpl"
    return _Call(endpoint, request, prompt_ids, job, protocol.new_id(prefix), started)


def token_budget(prompt_tokens: int, requested: int | None, default: int | None, max_seq_len: int) -> int:
    """Tokens a request may generate: what it asked for if prompt + that fits max_seq_len (else 400),
    or the endpoint's default cut to the room left (None: all of it)."""
    room = max_seq_len - prompt_tokens
    if room < 1:
        raise bad_request(
            f"the prompt is {prompt_tokens} tokens; the plan's max_seq_len {max_seq_len} leaves no room to generate",
            param="prompt", code="context_length_exceeded",
        )
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise bad_request(
            f"prompt {prompt_tokens} tokens + max_tokens {requested} = {prompt_tokens + requested} > the plan's "
            f"max_seq_len {max_seq_len}; ask for at most {room} tokens",
            param="max_tokens", code="context_length_exceeded",
        )
    return requested


def _encode_prompt(tokenizer: GuardedTokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids as `planc run` makes them (the tokenizer's own special tokens included)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        vocabulary = len(tokenizer)
        wrong = [token for token in prompt if not 0 <= token < vocabulary]
        if wrong:
            raise bad_request(f"token id {wrong[0]} is outside the vocabulary (0..{vocabulary - 1})", param="prompt")
        ids = list(prompt)
    if not ids:
        raise bad_request("the prompt encodes to no tokens", param="prompt")
    return ids


def _encode_chat(tokenizer: GuardedTokenizer, messages: list[dict]) -> list[int]:
    """The tokenizer's chat template with the assistant turn opened; the template adds special tokens."""
    from jinja2 import TemplateError

    if not tokenizer.chat_template:
        raise bad_request("the model's tokenizer has no chat template; use /v1/completions", param="messages")
    try:
        text = tokenizer.render_chat(messages)
    except TemplateError as exc:
        raise bad_request(f"the chat template refused the messages: {exc}", param="messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("the messages encode to no tokens", param="messages")
    return ids


async def _read_body(http: Request, limit: int) -> bytes:
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the body is {declared} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the body is over {limit} bytes, the most this server takes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(http: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


async def _next(job: Job, gone: asyncio.Future) -> Emitted | Failed | None:
    """The job's next event, or None if the client went away first."""
    getter = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return None


def _failure(error: BaseException) -> APIError:
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")


async def _collect(call: _Call, served: Served, event, gone: asyncio.Future) -> Response:
    """A whole completion as one JSON body."""
    token_ids, pieces = [], []
    while isinstance(event, Emitted):
        token_ids.append(event.token_id)
        pieces.append(event.text)
        if event.finish_reason is not None:
            break
        event = await _next(call.job, gone)
    served.metrics.generated_tokens.inc(len(token_ids))
    if event is None:
        served.scheduler.cancel(call.job)
        served.metrics.requests.labels(call.endpoint, "499").inc()
        return Response(status_code=499)  # nobody reads it: the client is gone
    if isinstance(event, Failed):
        served.metrics.requests.labels(call.endpoint, "500").inc()
        return _error_response(_failure(event.error))
    served.metrics.requests.labels(call.endpoint, "200").inc()
    served.metrics.latency.labels(call.endpoint).observe(time.perf_counter() - call.started)
    build = protocol.completion_body if call.endpoint == "completions" else protocol.chat_body
    body = build(call.rid, served.name, protocol.now(), "".join(pieces), event.finish_reason, call.prompt_ids,
                 token_ids, call.request.return_token_ids)
    return JSONResponse(body)


class _EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the response ends: completed, failed, or cut
    off by the client, even before its first chunk (when the body iterator never starts)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _stream_closed(call: _Call, served: Served) -> None:
    if call.status == "499":  # the client went away mid-stream: free its slot
        served.scheduler.cancel(call.job)
    served.metrics.requests.labels(call.endpoint, call.status).inc()


async def _stream(call: _Call, served: Served, event: Emitted):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    created, ids = protocol.now(), call.request.return_token_ids
    chat = call.endpoint == "chat"
    generated = 0
    if chat:
        yield protocol.sse(protocol.chat_chunk(call.rid, served.name, created, {"role": "assistant", "content": ""},
                                               None))
    while True:
        if isinstance(event, Failed):
            call.status = "500"
            yield protocol.sse(_failure(event.error).body())
            return
        generated += 1
        if event.text or event.finish_reason is not None or ids:
            token_ids = [event.token_id] if ids else None
            if chat:
                delta = {"content": event.text} if event.text else {}
                chunk = protocol.chat_chunk(call.rid, served.name, created, delta, event.finish_reason, token_ids)
            else:
                chunk = protocol.completion_chunk(call.rid, served.name, created, event.text, event.finish_reason,
                                                  token_ids)
            yield protocol.sse(chunk)
        if event.finish_reason is not None:
            break
        event = await call.job.events.get()
        if isinstance(event, Emitted):
            served.metrics.generated_tokens.inc()
    options = call.request.stream_options
    if options is not None and options.include_usage:
        kind = "chat.completion.chunk" if chat else "text_completion"
        yield protocol.sse(protocol.usage_chunk(call.rid, served.name, created, kind, len(call.prompt_ids),
                                                generated))
    yield protocol.sse("[DONE]")
    call.status = "200"
    served.metrics.latency.labels(call.endpoint).observe(time.perf_counter() - call.started)
