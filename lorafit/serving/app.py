"""The HTTP layer of `lorafit serve`: FastAPI routes that validate (protocol.py), call handlers.py and answer
JSON or server-sent events. It decides nothing about the model. Also here (Guard, around the app, before any
body is parsed): the bearer key, the body size cap; the OpenAI-shaped error for every failure (never a
traceback), one log line per request.
"""

from __future__ import annotations

import re
import secrets
import sys
import time
import traceback
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lorafit import log
from lorafit.serving import protocol as p
from lorafit.serving.handlers import Handlers
from lorafit.serving.protocol import APIError, ServerError, TooLarge, Unauthorized

MAX_BODY_BYTES = 4 * 1024 * 1024
DRAIN_BYTES = 64 * 1024 * 1024  # of a body refused (too large, no key), read and dropped before the answer


def create_app(handlers: Handlers, *, api_key: str | None = None, on_ready: Callable[[], None] | None = None,
               max_body: int = MAX_BODY_BYTES) -> FastAPI:
    from sse_starlette import EventSourceResponse
    from sse_starlette.sse import AppStatus

    # On SIGTERM uvicorn stops accepting and waits for the requests in flight; sse-starlette would cut the
    # streams among them short, so it is told not to.
    AppStatus.disable_automatic_graceful_drain()

    @asynccontextmanager
    async def lifespan(app):
        handlers.engine.start()
        if on_ready:
            on_ready()
        yield
        handlers.engine.stop()

    app = FastAPI(title="lorafit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    async def answer(call, body, request: Request):
        try:
            result = await call(body, request.state.note)
        except APIError:
            raise
        except Exception as e:  # ours, not the client's: the traceback on the server's log, a 500 to the client
            traceback.print_exc(file=sys.stderr)
            raise ServerError(f"internal error: {type(e).__name__}: {e}") from None
        if hasattr(result, "__aiter__"):
            return EventSourceResponse(result, sep="\n")
        return JSONResponse(result.model_dump(mode="json") if hasattr(result, "model_dump") else result)

    @app.get("/health")
    async def health():
        state = handlers.health()
        return JSONResponse(state, status_code=200 if state["engine_alive"] else 503)

    v1 = APIRouter(prefix="/v1")  # the API key is the Guard's: checked before the body is read

    @v1.get("/models")
    async def models():
        return JSONResponse(handlers.models().model_dump(mode="json"))

    @v1.post("/chat/completions")
    async def chat(body: p.ChatCompletionRequest, request: Request):
        return await answer(handlers.chat, body, request)

    @v1.post("/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        return await answer(handlers.completion, body, request)

    @v1.post("/classify")
    async def classify(body: p.ClassifyRequest, request: Request):
        return await answer(handlers.classify, body, request)

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: p.LoadAdapterRequest, request: Request):
        return await answer(handlers.load_adapter, body, request)

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: p.UnloadAdapterRequest, request: Request):
        return await answer(handlers.unload_adapter, body, request)

    app.include_router(v1)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return JSONResponse(validation_error(e.errors()).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        error = APIError(message.get(e.status_code, str(e.detail)), status=e.status_code, code="not_found"
                         if e.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    return Guard(app, max_body, api_key=api_key.strip() if api_key is not None else None)


def validation_error(errors) -> APIError:
    """Pydantic's first complaint as one OpenAI error: 'messages: Field required', or malformed JSON."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        where = (first.get("ctx") or {}).get("error", "")
        return APIError(f"malformed JSON in the request body{': ' + where if where else ''}", code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if not param and first.get("type") == "missing":
        message = "the request body is missing: send a JSON object"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return APIError(f"{param + ': ' if param else ''}{message}{more}", param=param)


class Guard:
    """ASGI middleware around the app, before any body is parsed: a /v1 request without the API key is a 401; a
    body above *max_body* bytes is a 413 (declared or chunked: the body is read here, whole, and handed to the
    app). One line per request on stderr once its last byte is sent (streams included): method, path, status,
    model, tokens in/out, the most requests it was decoded with, milliseconds."""

    def __init__(self, app: FastAPI, max_body: int, api_key: str | None = None):
        self.app, self.max_body, self.api_key = app, max_body, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, note = time.perf_counter(), [0], {}
        scope.setdefault("state", {})["note"] = note

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                _log(scope, status[0], note, started)

        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope.get("path", "").startswith("/v1") and not self._authorized(headers):
            return await _refuse(Unauthorized("missing or wrong API key: send the header 'Authorization: Bearer KEY'"),
                                 scope, receive, logged_send)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await _refuse(_too_large(self.max_body), scope, receive, logged_send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was whole: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await _refuse(_too_large(self.max_body), scope, receive, logged_send,
                                     more=message.get("more_body", False))
            if not message.get("more_body", False):
                break
        body, handed = b"".join(chunks), False

        async def replay():  # the body once, then the client's own messages (a disconnect ends a stream)
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, logged_send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())


async def _refuse(error: APIError, scope, receive, send, *, more: bool = True) -> None:
    """Answer *error* without handing the request to the app. The rest of the body is read (never kept) up to a
    bound first, so that a client still sending sees the answer and not a reset connection."""
    drained = 0
    while more and drained < DRAIN_BYTES:
        message = await receive()
        drained += len(message.get("body", b""))
        more = message["type"] == "http.request" and message.get("more_body", False)
    await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"the request body is larger than {limit // (1024 * 1024)} MiB")


def _log(scope, status: int, note: dict, started: float) -> None:
    parts = [_shown(scope.get("method", "")), _shown(scope.get("path", "")), str(status)]
    if "model" in note:
        parts.append(f"model={_shown(note['model'])}")
    if "in" in note:
        parts.append(f"tokens in={note['in']} out={note.get('out', 0)}")
    if "batch" in note:
        parts.append(f"batch {note['batch']}")
    parts.append(f"{(time.perf_counter() - started) * 1000:.0f} ms")
    log.info(" ".join(parts))


_PLAIN = re.compile(r"[\w./:@+-]{1,200}")


def _shown(text: str) -> str:
    """A client's string as the log shows it: as it is when plain, else quoted with its control characters escaped
    (a name cannot forge a line of its own), cut at 200 characters."""
    text = str(text)
    return text if _PLAIN.fullmatch(text) else repr(text[:200])
