"""`pagedserve serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over an AsyncLLM."""

import asyncio
import hmac
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import pagedserve
from pagedserve.frontend.async_llm import AsyncLLM, QueueFullError

from .protocol import ChatCompletionRequest, CompletionRequest, error_body
from .serving import ContextLengthError, EngineFault, OpenAIServing

logger = logging.getLogger("pagedserve")


def _error(status: int, message: str, err_type: str = "invalid_request_error", param: str | None = None,
           code: str | int | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, err_type, param, code if code is not None else status), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"invalid JSON body: {first.get('msg')}", None
    param = location[0] if location else None
    where = ".".join(location) or "body"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg')}{more}", param


async def _until_disconnected(request: Request, work: Awaitable) -> Response | None:
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


def build_app(engine: AsyncLLM, model_name: str, api_key: str | None = None,
              chat_template: str | None = None) -> FastAPI:
    serving = OpenAIServing(engine, model_name, chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="pagedserve", version=pagedserve.__version__, lifespan=lifespan)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable) -> Response:
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            if not hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "Incorrect API key provided.", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    def check_model(name: str | None) -> JSONResponse | None:
        if name is not None and name != model_name:
            return _error(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return None

    async def respond(request: Request, make: Callable[[], object]) -> Response:
        try:
            result = make()
            if isinstance(result, dict):
                return JSONResponse(result)
            if hasattr(result, "__aiter__"):
                return StreamingResponse(result, media_type="text/event-stream")
            body = await _until_disconnected(request, result)
            return JSONResponse(body) if body is not None else Response(status_code=499)
        except ContextLengthError as e:
            return _error(400, str(e), param="max_tokens")
        except ValueError as e:
            return _error(400, str(e))
        except QueueFullError as e:
            return _error(503, str(e), err_type="service_unavailable")
        except EngineFault as e:
            return _error(500, str(e), err_type="server_error")
        except RuntimeError as e:  # the engine is gone
            return _error(503, str(e), err_type="service_unavailable")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return check_model(body.model) or await respond(request, lambda: serving.completions(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return check_model(body.model) or await respond(request, lambda: serving.chat(body))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "pagedserve",
            "root": engine.config.model_path, "max_model_len": engine.config.max_model_len,
        }]}

    @app.get("/health")
    async def health() -> Response:
        if engine.errored:
            return _error(503, f"the engine is not running: {engine.errored}", err_type="service_unavailable")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": pagedserve.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        if not await engine.reset_prefix_cache():
            return _error(409, "the prefix cache cannot be reset while requests hold cached blocks",
                          err_type="conflict")
        return Response(status_code=200)

    return app


def run_server(engine: AsyncLLM, model_name: str, host: str, port: int, api_key: str | None,
               chat_template: str | None, shutdown_timeout: float) -> None:
    """Serve until SIGINT/SIGTERM: then stop accepting, give in-flight requests `shutdown_timeout` seconds,
    abort the rest, stop the engine and return (exit 0)."""
    app = build_app(engine, model_name, api_key, chat_template)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
    server = uvicorn.Server(config)
    logger.info("serving %s on http://%s:%d (OpenAI API under /v1)", model_name, host, port)
    logger.info("try: curl http://%s:%d/v1/completions -H 'Content-Type: application/json' -d "
                "'{\"model\": \"%s\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}'",
                host, port, model_name)
    # uvicorn handles SIGINT/SIGTERM (graceful shutdown), then re-raises the signal to the handler that was
    # installed before it; a no-op one makes a requested shutdown end with exit status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    logger.info("server stopped")
