"""The ASGI app: OpenAI's chat-completions, models, health and metrics routes over one loaded model.

FastAPI (on Starlette, served by uvicorn) because it is the stack the OpenAI-compatible servers people
run are built on (vLLM, SGLang, lmms-eval's own tooling), Ray Serve deploys a FastAPI app as it is, and
uvicorn drains in-flight requests on Ctrl-C / SIGTERM. Bodies are read and checked by hand rather than
by pydantic models, so that every mistake gets OpenAI's error shape with one line of our own words.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from vidsparse.errors import first_line
from vidsparse.options import DEFAULT_MAX_FRAMES, AskOptions
from vidsparse.pipeline import VideoQA
from vidsparse.serve.backend import Completion, LocalBackend, pieces_then_result
from vidsparse.serve.chat import ChatRequest, RequestError, parse_chat
from vidsparse.serve.media import MediaPolicy, fetch
from vidsparse.serve.scheduler import QueueFull
from vidsparse.serve.telemetry import CONTENT_TYPE, Telemetry

CLIENT_GONE = 499  # (nginx's code) counted in the metrics; no response is sent
log = logging.getLogger("vidsparse.serve")


@dataclass(frozen=True)
class ServeSettings:
    """What `vidsparse serve`'s flags decide, typed once."""

    model_name: str
    defaults: AskOptions  # the pruning and sampling a request gets unless its `vidsparse` object says
    media: MediaPolicy
    api_key: str | None = None
    max_tokens: int = 256  # the most tokens an answer may have, whatever a request asks
    max_video_seconds: float = 3600.0
    max_body_bytes: int = 64 * 2**20
    cache_bytes: int = 512 * 2**20
    max_queue: int = 16
    request_timeout_s: float = 300.0


def error_body(error: RequestError) -> dict:
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": None}}


def error_response(error: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=headers)


def fault(error: Exception) -> RequestError:
    """A server fault as the client sees it: one line, no traceback."""
    return RequestError(500, f"internal error: {first_line(error)[:300]}", kind="server_error")


async def read_json(request: Request, limit: int) -> object:
    """The body as JSON, never more than `limit` bytes read (a chunked body is cut off there too)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is larger than the server's limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request body is larger than the server's limit of {limit} bytes")
        chunks.append(chunk)
    try:  # off the event loop: a large body must not stall the other requests
        return await run_in_threadpool(json.loads, b"".join(chunks))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, an integer past 4300 digits, nested too deep
        raise RequestError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None


Ended = Callable[[int, Completion | None], None]  # how a response ended: its status, its answer if it had one


async def stream_events(chat: ChatRequest, first: str | Completion, rest: AsyncIterator[str | Completion | None],
                        ident: str, created: int, ended: Ended) -> AsyncIterator[str]:
    """The answer as OpenAI's server-sent chunks while it is decoded: the role, each piece of text as it
    is settled (`first`, then what `rest` sends), what is left of the text, the finish reason, usage
    when asked (`stream_options.include_usage`), then [DONE]. A failure once the stream has begun is an
    error event in OpenAI's shape (the status line went out with the first chunk). `ended(status,
    completion)` is told how it ended (499: the client left)."""
    base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": chat.model}

    def event(choices: list, **extra) -> str:
        return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

    def text(piece: str) -> str:
        return event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])

    status, done = 499, None
    try:
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        item, sent = first, ""
        while isinstance(item, str):
            yield text(item)
            sent += item
            item = await anext(rest)
        if item is None:  # the client left
            return
        done = item
        if not done.text.startswith(sent):  # never seen: the feed sends only text no later token changes
            log.warning("a streamed answer's pieces are not the start of its text: %r, %r", sent, done.text)
        if len(done.text) > len(sent):
            yield text(done.text[len(sent) :])
        yield event([{"index": 0, "delta": {}, "finish_reason": done.finish_reason}])
        if chat.include_usage:
            yield event([], usage=done.usage, vidsparse=done.stats)
        yield "data: [DONE]\n\n"
        status = 200
    except RequestError as e:
        status = e.status
        yield f"data: {json.dumps(error_body(e))}\n\n"
    except Exception as e:  # noqa: BLE001 - a fault after the stream began: said in the stream, the server goes on
        status = 500
        yield f"data: {json.dumps(error_body(fault(e)))}\n\n"
    finally:
        await rest.aclose()  # a client that left cancels its decoding
        ended(status, done)


class Backend(Protocol):
    """What answers checked requests (serve.backend.LocalBackend, serve.ray_serve.RayBackend)."""

    depth: int

    def start(self) -> None: ...

    def check_room(self) -> None: ...  # raise QueueFull where a request now would be refused with 429

    def close(self) -> None: ...

    async def complete(self, chat: ChatRequest, media, gone, send=None) -> Completion | None: ...  # send: pieces


def local_app(qa: VideoQA, settings: ServeSettings) -> FastAPI:
    """The app answering with `qa` in this process (loaded already)."""
    return create_app(LocalBackend(qa, settings.cache_bytes, settings.max_queue, settings.max_video_seconds,
                                   settings.request_timeout_s), settings)


def create_app(backend: Backend, settings: ServeSettings) -> FastAPI:
    """The HTTP layer over `backend`: every check a request needs before the model, the response."""
    telemetry = Telemetry(lambda: backend.depth)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        try:
            yield
        finally:
            await run_in_threadpool(backend.close)  # what is queued is answered first

    app = FastAPI(title="vidsparse", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)

    def authorised(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise RequestError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                               kind="authentication_error")

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(RequestError(error.status_code, message.get(error.status_code, str(error.detail))))

    @app.exception_handler(Exception)
    async def server_fault(request: Request, error: Exception) -> JSONResponse:
        telemetry.finished(500)
        return error_response(fault(error))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorised(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "vidsparse"}]}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        authorised(request)
        return Response(telemetry.text(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        start = time.perf_counter()
        try:
            authorised(request)
            chat = parse_chat(await read_json(request, settings.max_body_bytes), settings.defaults,
                              settings.max_tokens)
            if chat.model != settings.model_name:
                raise RequestError(404, f"model {chat.model!r} is not served here (this server serves "
                                        f"{settings.model_name!r})", "model", kind="not_found_error")
            check_frame_limits(chat, settings.media.max_frames)
            try:
                backend.check_room()  # before the clip is fetched: a full queue must not cost its memory
                media = await run_in_threadpool(fetch, chat.media, settings.media)
                if chat.stream:  # the status waits for the first piece of text (or the refusal)
                    events = pieces_then_result(
                        lambda send: backend.complete(chat, media, request.is_disconnected, send))
                    done = await anext(events)
                else:
                    done = await backend.complete(chat, media, request.is_disconnected)
            except QueueFull as e:
                telemetry.finished(429)
                return error_response(RequestError(429, str(e), kind="rate_limit_error"), {"Retry-After": "1"})
        except RequestError as e:
            telemetry.finished(e.status)
            return error_response(e)
        except ClientDisconnect:  # it left while sending its body
            telemetry.finished(CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)
        if done is None:
            telemetry.finished(CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def ended(status: int, completion: Completion | None) -> None:
            telemetry.finished(status, time.perf_counter() - start if status == 200 else None)
            if completion is not None:
                telemetry.answered(completion.stats)

        if chat.stream:
            return StreamingResponse(stream_events(chat, done, events, ident, created, ended),
                                     media_type="text/event-stream")
        ended(200, done)
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": chat.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": done.usage, "vidsparse": done.stats,
        })

    return app


def check_frame_limits(chat: ChatRequest, max_frames: int) -> None:
    """Refuse sampling settings that ask for more frames than the server allows."""
    options = chat.options
    asked = options.num_frames if options.fps is None else options.max_frames or DEFAULT_MAX_FRAMES
    if asked > max_frames:
        raise RequestError(400, f"{asked} frames asked: the server samples at most {max_frames} (vidsparse.frames, "
                                "vidsparse.max_frames)", "vidsparse")
