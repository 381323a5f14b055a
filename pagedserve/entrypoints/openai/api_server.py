"""`pagedserve serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over an AsyncLLM.

Every error it sends is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the real
status: 400 bad input (pydantic's 422 included), 401 no API key, 404 unknown model or route, 405, 413 body
too large, 503 queue full or engine down, 500 an engine fault. The OpenAPI document lists them.
"""

import asyncio
import hmac
import inspect
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import pagedserve
from pagedserve.frontend.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from pagedserve.frontend.engine_client import EngineClient

from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    SessionCloseRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    error_body,
)
from .responses.routes import add_responses_routes
from .responses.serving_responses import ResponsesServing
from .serving import ContextLengthError, EngineFault, EventStream, ServingOptions, text_executor
from .serving_chat import ChatServing
from .serving_completion import CompletionServing
from .serving_tokenization import TokenizationServing

logger = logging.getLogger("pagedserve")

# Routes anyone may call; every other one needs the API key when the server has one.
OPEN_ROUTES = ("/health", "/version", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: ~1M tokens of text, more than any context here

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
                405: "invalid_request_error", 409: "conflict", 413: "invalid_request_error",
                500: "server_error", 503: "service_unavailable"}


def error_response(status: int, message: str, param: str | None = None, code: str | int | None = None) -> JSONResponse:
    body = error_body(message, _ERROR_TYPES.get(status, "invalid_request_error"), param,
                      code if code is not None else status)
    return JSONResponse(body, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = location[0] if location else None
    where = ".".join(location) or "body"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg')}{more}", param


class BodySizeLimit:
    """Refuse a body over `max_bytes` at once (413): by its Content-Length before reading it, or while reading
    one sent in chunks. Nothing big is ever parsed or tokenized."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes (--max-request-body-bytes)"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, self._message())(scope, receive, send)


class EventStreamResponse(StreamingResponse):
    """SSE whose requests are aborted however the response ends: streamed to the end, the client gone before the
    first event or during the stream, the server stopping."""

    def __init__(self, stream: EventStream) -> None:
        super().__init__(stream.events, media_type="text/event-stream")
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()


async def _until_disconnected(request: Request, work: Awaitable) -> Any:
    """Run `work`, but cancel it (aborting its requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in (
        (400, "Bad input"), (401, "Missing or wrong API key"), (404, "Unknown model"), (413, "Body too large"),
        (500, "The engine failed the request"), (503, "Queue full, or the engine is not running"))}
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The whole response, or with `stream: true` a stream of server-sent events",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "text/event-stream": {"schema": {"type": "string"}}}},
    **_ERRORS,
}


def build_app(engine: EngineClient, options: ServingOptions, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    text_threads = text_executor()
    completion_serving = CompletionServing(engine, options, text_threads)
    chat_serving = ChatServing(engine, options, text_threads)
    responses_serving = ResponsesServing(engine, options, text_threads)
    tokenization_serving = TokenizationServing(engine, options, text_threads)
    model_name = options.model_name

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        await responses_serving.shutdown()
        await engine.shutdown()
        text_threads.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="pagedserve", version=pagedserve.__version__, lifespan=lifespan)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable) -> Response:
        if api_key and request.url.path not in OPEN_ROUTES:
            header = request.headers.get("authorization", "")
            if not hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "Incorrect API key provided.", code="invalid_api_key")
        return await call_next(request)

    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}")

    def check_model(name: str | None) -> JSONResponse | None:
        if name is not None and name != model_name:
            return error_response(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return None

    async def respond(request: Request, make: Callable[[], Awaitable]) -> Response:
        try:
            result = await make()
            if isinstance(result, EventStream):
                return EventStreamResponse(result)
            if not inspect.isawaitable(result):  # a stream that ends its work itself (the Responses API's runs)
                return StreamingResponse(result, media_type="text/event-stream")
            body = await _until_disconnected(request, result)
            return JSONResponse(body) if body is not None else Response(status_code=499)
        except ContextLengthError as e:
            return error_response(400, str(e), param="max_tokens")
        except ValueError as e:
            return error_response(400, str(e))
        except (QueueFullError, EngineDeadError) as e:
            return error_response(503, str(e))
        except EngineFault as e:
            return error_response(500, str(e))

    @app.post("/v1/completions", responses=_GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return check_model(body.model) or await respond(request, lambda: completion_serving.completions(body))

    @app.post("/v1/chat/completions", responses=_GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return check_model(body.model) or await respond(request, lambda: chat_serving.chat(body))

    add_responses_routes(app, responses_serving, respond, error_response, check_model, _GENERATION_RESPONSES)

    async def answer(model: str | None, work: Coroutine[Any, Any, dict]) -> Response:
        unknown = check_model(model)
        if unknown is not None:
            work.close()  # never started
            return unknown
        try:
            return JSONResponse(await work)
        except ValueError as e:
            return error_response(400, str(e))

    @app.post("/tokenize", responses={400: _ERRORS[400], 401: _ERRORS[401], 404: _ERRORS[404]})
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> Response:
        return await answer(body.model, tokenization_serving.tokenize(body))

    @app.post("/detokenize", responses={400: _ERRORS[400], 401: _ERRORS[401], 404: _ERRORS[404]})
    async def detokenize(body: DetokenizeRequest) -> Response:
        return await answer(body.model, tokenization_serving.detokenize(body))

    @app.get("/v1/models", responses={401: _ERRORS[401]})
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "pagedserve",
            "root": engine.config.model_path, "max_model_len": engine.config.max_model_len,
        }]}

    @app.get("/health", response_class=Response, responses={200: {"description": "The engine is running"},
                                   503: {"model": ErrorResponse, "description": "The engine is not running"}})
    async def health() -> Response:
        if engine.errored:
            return error_response(503, f"the engine is not running: {engine.errored}")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": pagedserve.__version__}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}})
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache", response_class=Response, responses={
        200: {"description": "Every cached prefix block is dropped"}, 401: _ERRORS[401],
        409: {"model": ErrorResponse, "description": "Requests hold cached blocks"}, 503: _ERRORS[503]})
    async def reset_prefix_cache() -> Response:
        try:
            reset = await engine.reset_prefix_cache()
        except EngineDeadError as e:
            return error_response(503, str(e))
        if not reset:
            return error_response(409, "the prefix cache cannot be reset while requests hold cached blocks")
        return Response(status_code=200)

    @app.post("/v1/sessions/{session_id}/close", responses={
        200: {"description": "The session's kept KV is released"}, 401: _ERRORS[401],
        400: _ERRORS[400], 404: {"model": ErrorResponse, "description": "No such session (under this cache_salt)"},
        503: _ERRORS[503]})
    async def close_session(session_id: str, body: SessionCloseRequest | None = None) -> Response:
        try:
            closed = await engine.close_session(session_id, body.cache_salt if body is not None else None)
        except EngineDeadError as e:
            return error_response(503, str(e))
        if not closed:
            return error_response(404, f"no session {session_id!r}", param="session_id", code="session_not_found")
        return JSONResponse({"id": session_id, "object": "session", "closed": True})

    def openapi() -> dict:
        """FastAPI's document, without the 422 it adds to every route with a body: we answer 400."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class _Server(uvicorn.Server):
    """uvicorn, plus: when the shutdown grace period is about to end, the requests still open are ended by
    the engine with a final error event and [DONE] (streams) or a 503 (whole responses), so no client sees a
    cut connection; and a fatal engine failure stops the server with exit status 1."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.shutdown_timeout, self.engine.end_requests, "the server is shutting down")
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def fatal(self, message: str) -> None:
        self.exit_code = 1
        self.should_exit = True


async def serve(engine: AsyncLLM, options: ServingOptions, sock: socket.socket, api_key: str | None,
                shutdown_timeout: float, max_body_bytes: int, log_level: str) -> int:
    """Start the engine, then serve on `sock` until SIGINT/SIGTERM (stop accepting, give open requests
    `shutdown_timeout` seconds, end the rest) or a fatal engine failure. The exit status."""
    try:
        await engine.start()
    except Exception as e:  # one line; the traceback with --log-level debug
        logger.debug("engine start-up failed", exc_info=True)
        logger.error("%s", e)
        await engine.shutdown()
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        # uvicorn handles these while it serves, then raises them again against the handler that was there
        # before: a no-op one makes a requested shutdown end with the server's own exit status.
        signal.signal(sig, lambda *_: None)
    app = build_app(engine, options, api_key, max_body_bytes)
    config = uvicorn.Config(app, log_level="debug" if log_level == "debug" else "warning",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 5)
    server = _Server(config, engine, shutdown_timeout)
    engine.on_fatal = server.fatal
    host, port = sock.getsockname()[:2]
    if engine.config.generation_defaults:
        logger.info("sampling defaults from the model's generation config (a request's own values win; "
                    "--generation-config vllm for none): %s", engine.config.generation_defaults)
    logger.info("serving %s on http://%s:%d (OpenAI API under /v1)", options.model_name, host, port)
    logger.info("try: curl http://%s:%d/v1/completions -H 'Content-Type: application/json' -d "
                "'{\"model\": \"%s\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}'",
                host, port, options.model_name)
    await server.serve(sockets=[sock])
    logger.info("server stopped")
    return server.exit_code
