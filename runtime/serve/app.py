"""The HTTP side of lfm-serve: a Starlette app over one LfmModel, in OpenAI's shapes.

    GET  /v1/models              the one model this server holds
    POST /v1/chat/completions    an answer, whole or streamed as server-sent events
    GET  /health, /v1/lfm/stats  status, the queue, the kept conversation states and their memory

One generation runs at a time (a phone has the cores for one); up to `queue` more requests wait for it, and
beyond that a request gets 429 at once. Generation runs on a worker thread and hands its events to the request's
task; a client that goes away mid-stream, or stops reading for `write_timeout` seconds, cancels its generation at
the next token. Request bodies are bounded (`max_body`, 413), and so is the time to send one (`read_timeout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..constrain import ConstraintError
from ..conversation import ContextFull
from ..events import Done, ReasoningDelta, TextDelta, ToolCallEvent
from ..model import LfmModel
from ..templates import TemplateError
from .protocol import (
    ApiError,
    ChatRequest,
    chunk,
    completion,
    finish_reason,
    new_id,
    parse_request,
    remember_key,
    tool_call_objects,
    usage,
)
from .states import Lease, StatePool

__all__ = ["ServeOptions", "create_app"]

DEFAULT_MAX_TOKENS = 2048  # when a request names none (and the context has room)


@dataclass(frozen=True)
class ServeOptions:
    """How the server serves: the model's id, an API key (None: none asked), the kept states' budget, the waiting
    requests allowed, and the bounds on a request's body and on slow clients."""

    model_id: str
    api_key: str | None = None
    state_bytes: int = 256 << 20
    queue: int = 8
    max_body: int = 8 << 20
    read_timeout: float = 30.0
    write_timeout: float = 60.0


class _Server:
    """What the routes share: the model, the pool of states, the generation slot and its queue."""

    def __init__(self, model: LfmModel, options: ServeOptions):
        self.model, self.options = model, options
        self.states = StatePool(model, options.state_bytes)
        self.slot = asyncio.Lock()
        self.waiting = 0
        self.raw_texts: OrderedDict[str, str] = OrderedDict()  # our answers' text as the model wrote it
        self.served = self.errors = 0
        self.started = time.time()

    def remember(self, done: Done) -> None:
        self.raw_texts[remember_key(done.text, done.tool_calls)] = done.raw
        while len(self.raw_texts) > 1024:
            self.raw_texts.popitem(last=False)


def create_app(model: LfmModel, options: ServeOptions) -> Starlette:
    """The ASGI app serving `model`."""
    server = _Server(model, options)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(server)]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": options.model_id, "generating": server.slot.locked(),
                             "waiting": server.waiting, "states": server.states.stats()})

    async def stats(request: Request) -> Response:
        return JSONResponse({"model": options.model_id, "uptime_s": round(time.time() - server.started, 1),
                             "served": server.served, "errors": server.errors, "states": server.states.stats(),
                             "waiting": server.waiting, "queue": options.queue})

    async def completions(request: Request) -> Response:
        body = await _read_body(request, options)
        chat = parse_request(body, dict(server.raw_texts))
        if chat.model != options.model_id:
            raise ApiError(404, f"The model '{chat.model}' does not exist (this server serves "
                                f"'{options.model_id}')", "model", "model_not_found")
        if server.waiting >= options.queue and server.slot.locked():
            raise ApiError(429, f"server busy: {server.waiting} requests are waiting for the one generation slot",
                           None, "busy")
        if chat.stream:
            return _StreamResponse(server, chat)
        cancel = threading.Event()
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, cancel))
        try:
            async with _slot(server):
                done = await _generate(server, chat, lambda event: None, cancel)
        finally:
            watcher.cancel()
        server.served += 1
        return JSONResponse(completion(new_id(), options.model_id, done, tool_call_objects(done.tool_calls)))

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/v1/lfm/stats", stats, methods=["GET"]),
              Route("/v1/chat/completions", completions, methods=["POST"])]

    async def api_error(request: Request, exc: Exception) -> Response:
        server.errors += 1
        error = exc if isinstance(exc, ApiError) else ApiError(500, f"internal error: {type(exc).__name__}")
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    async def http_error(request: Request, exc: Any) -> Response:
        server.errors += 1
        status = getattr(exc, "status_code", 500)
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed here"}.get(
            status, str(getattr(exc, "detail", "error")))
        return JSONResponse(ApiError(status, message).body(), status_code=status)

    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, 404: http_error, 405: http_error,
                                                      Exception: api_error})
    return _Authenticated(app, options.api_key) if options.api_key else app


@contextlib.asynccontextmanager
async def _slot(server: _Server) -> AsyncIterator[None]:
    """The one generation slot, counted as waiting until it is ours (a cancelled wait is counted out too)."""
    server.waiting += 1
    try:
        await server.slot.acquire()
    finally:
        server.waiting -= 1
    try:
        yield
    finally:
        server.slot.release()


async def _cancel_on_disconnect(receive: Callable, cancel: threading.Event) -> None:
    """Set `cancel` when the client goes away (the body was read: what comes next is the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def _model_card(server: _Server) -> dict:
    manifest = server.model.session.manifest or {}
    return {"id": server.options.model_id, "object": "model", "created": int(server.started), "owned_by": "lfm-edge",
            "context_length": server.model.session.context_length, "quant": manifest.get("quant")}


class _Authenticated:
    """An ASGI wrapper: every HTTP request must carry `Authorization: Bearer KEY`, else 401 in OpenAI's shape."""

    def __init__(self, app: Any, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                body = json.dumps(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", None,
                                           "invalid_api_key").body()).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def _read_body(request: Request, options: ServeOptions) -> Any:
    """The JSON body, bounded in size (413) and in the time the client takes to send it (408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > options.max_body:
        raise ApiError(413, f"request body of {int(declared):,} bytes; at most {options.max_body:,}", None,
                       "body_too_large")

    async def read() -> bytes:
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > options.max_body:
                raise ApiError(413, f"request body over {options.max_body:,} bytes", None, "body_too_large")
        return bytes(data)

    try:
        raw = await asyncio.wait_for(read(), options.read_timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body took more than {options.read_timeout:g} s", None, "timeout") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:120]})") from None


async def _generate(server: _Server, chat: ChatRequest, on_event: Callable[[Any], None],
                    cancel: threading.Event) -> Done:
    """Run one generation on a worker thread (the caller holds the slot); `on_event` sees each event there."""
    model = server.model

    def work() -> Done:
        lease = server.states.take(chat.messages, chat.tools)
        try:
            return _answer(model, lease, chat, on_event, cancel)
        finally:
            server.states.give(lease)

    future = asyncio.get_running_loop().run_in_executor(None, work)
    try:
        done = await asyncio.shield(future)
    except asyncio.CancelledError:  # the request went away: the thread stops at its next token, and until it has,
        cancel.set()                 # the slot stays taken
        await asyncio.wait({future})
        raise
    except ContextFull as e:
        raise ApiError(400, f"This model's maximum context length is {model.session.context_length} tokens: {e}",
                       "messages", "context_length_exceeded") from None
    except (TemplateError, ConstraintError) as e:
        raise ApiError(400, str(e)) from None
    except ValueError as e:  # a request the runtime refuses (a malformed message, a bad sampling value)
        raise ApiError(400, str(e)) from None
    server.remember(done)
    return done


def _answer(model: LfmModel, lease: Lease, chat: ChatRequest, on_event: Callable[[Any], None],
            cancel: threading.Event) -> Done:
    context = model.session.context_length
    room = context - len(lease.prompt)
    if chat.max_tokens is not None and len(lease.prompt) + chat.max_tokens > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{len(lease.prompt) + chat.max_tokens} tokens ({len(lease.prompt)} in the messages, "
                            f"{chat.max_tokens} in the completion). Please reduce the length of the messages or "
                            "completion.", "messages", "context_length_exceeded")
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {context} tokens; the messages take "
                            f"{len(lease.prompt)}", "messages", "context_length_exceeded")
    max_tokens = chat.max_tokens or min(DEFAULT_MAX_TOKENS, room)
    sampling = model.default_sampling(**chat.sampling)
    done = None
    for event in lease.conversation.send(None, sampling=sampling, max_new_tokens=max_tokens, stop=chat.stop,
                                         cancel=cancel, response_format=chat.response_format,
                                         reasoning_budget=chat.reasoning_budget, tool_choice=chat.tool_choice):
        if isinstance(event, Done):
            done = event
        on_event(event)
    assert done is not None
    return done


class _StreamResponse(Response):
    """Server-sent events of chat.completion.chunk objects, then `data: [DONE]`. Written with a timeout per
    message: a client that stops reading cancels its generation instead of holding the slot."""

    media_type = "text/event-stream"

    def __init__(self, server: _Server, chat: ChatRequest):
        self.server, self.chat = server, chat
        self.status_code, self.background = 200, None
        # no content-length: the body is a stream
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        server, chat, options = self.server, self.chat, self.server.options
        cancel = threading.Event()
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        completion_id, created = new_id(), int(time.time())

        async def write(data: dict | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            await asyncio.wait_for(send({"type": "http.response.body", "body": f"data: {text}\n\n".encode(),
                                         "more_body": True}), options.write_timeout)

        watcher = asyncio.create_task(_cancel_on_disconnect(receive, cancel))
        task: asyncio.Task | None = None
        try:
            async with _slot(server):
                try:
                    await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                    await write(chunk(completion_id, options.model_id, created, {"role": "assistant", "content": ""}))
                    task = asyncio.create_task(_generate(
                        server, chat, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), cancel))
                    async for data in _deltas(events, task, completion_id, options.model_id, created, chat):
                        if cancel.is_set():
                            break
                        await write(data)
                    try:
                        await task
                    except ApiError as e:  # refused after the headers went out: said in the stream
                        await write({"error": e.body()["error"]})
                    await write("[DONE]")
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    server.served += 1
                finally:  # the slot is the worker thread's until it has stopped, whatever ended the stream
                    cancel.set()
                    if task is not None:
                        await asyncio.shield(asyncio.wait({task}))
                        if not task.cancelled():
                            task.exception()  # retrieved: an error after the client left is no one's to read
        except (asyncio.TimeoutError, OSError):  # the client stopped reading or went away: its generation stopped
            pass
        finally:
            watcher.cancel()


async def _deltas(events: asyncio.Queue, task: asyncio.Task, completion_id: str, model: str, created: int,
                  chat: ChatRequest) -> AsyncIterator[dict]:
    """The chunks of a streamed answer, as the generation's events arrive. The reasoning is sent trimmed, as the
    whole answer's `reasoning_content` is: leading whitespace dropped, trailing whitespace held back until more
    reasoning follows it."""
    reasoning_started, held = False, ""
    while True:
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            if events.empty():
                return  # the generation ended (or failed) with nothing more to send
            continue
        event = getter.result()
        if isinstance(event, TextDelta) and event.text:
            yield chunk(completion_id, model, created, {"content": event.text})
        elif isinstance(event, ReasoningDelta) and event.text:
            text = held + (event.text if reasoning_started else event.text.lstrip())
            reasoning_started = reasoning_started or bool(text)
            body = text.rstrip()
            held = text[len(body):]
            if body:
                yield chunk(completion_id, model, created, {"reasoning_content": body})
        elif isinstance(event, ToolCallEvent) and event.calls:
            calls = [dict(c, index=n) for n, c in enumerate(tool_call_objects(event.calls))]
            yield chunk(completion_id, model, created, {"tool_calls": calls})
        elif isinstance(event, Done):
            yield chunk(completion_id, model, created, {}, finish_reason(event))
            if chat.include_usage:
                yield chunk(completion_id, model, created, None, usage_=usage(event))
            return
