"""The /v1/responses routes, added to the server's app by `build_app`.

A stored response belongs to its tenant: the API key the client sent (`Authorization: Bearer ...`) and its
`cache_salt` (a body field when creating; a query parameter on the other routes). Another tenant's response
is not found (404), whether it is read, chained from, cancelled or deleted.
"""

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..protocol import ErrorResponse
from .protocol import ResponsesRequest
from .serving_responses import ResponsesServing
from .store import ResponseNotFound, tenant_of

ErrorResponder = Callable[..., JSONResponse]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse, "description": "No such response"}}


def tenant(request: Request, cache_salt: str | None) -> str:
    header = request.headers.get("authorization", "")
    key = header[len("bearer "):] if header[:len("bearer ")].lower() == "bearer " else header
    return tenant_of(key or None, cache_salt)


def add_responses_routes(app: FastAPI, serving: ResponsesServing, respond: Callable[..., Awaitable[Response]],
                         error_response: ErrorResponder, check_model: Callable[[str | None], JSONResponse | None],
                         generation_responses: dict[int | str, dict[str, Any]]) -> None:
    """`respond`, `error_response`, `check_model`, `generation_responses`: the app's own (admission errors, the
    error shape, model names, the documented statuses), so these routes answer as the others do."""
    errors = {**{status: doc for status, doc in generation_responses.items() if status != 200}, **_NOT_FOUND}

    async def answer(make: Callable[[], Awaitable[Any]]) -> Response:
        try:
            result = await make()
        except ResponseNotFound as e:
            return error_response(404, str(e), param=e.param)
        except ValueError as e:
            return error_response(400, str(e))
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream")

    @app.post("/v1/responses", responses={**generation_responses, **_NOT_FOUND})
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        refused = check_model(body.model)
        if refused is not None:
            return refused
        try:
            return await respond(request, lambda: serving.create(body, tenant(request, body.cache_salt)))
        except ResponseNotFound as e:  # previous_response_id
            return error_response(404, str(e), param=e.param, code="previous_response_not_found")

    @app.get("/v1/responses/{response_id}", responses={200: generation_responses[200], **errors})
    async def retrieve_response(response_id: str, request: Request, stream: bool = False,
                                starting_after: int | None = None, cache_salt: str | None = None) -> Response:
        return await answer(lambda: serving.retrieve(response_id, tenant(request, cache_salt), stream,
                                                     starting_after))

    @app.delete("/v1/responses/{response_id}", responses=errors)
    async def delete_response(response_id: str, request: Request, cache_salt: str | None = None) -> Response:
        return await answer(lambda: serving.delete(response_id, tenant(request, cache_salt)))

    @app.post("/v1/responses/{response_id}/cancel", responses=errors)
    async def cancel_response(response_id: str, request: Request, cache_salt: str | None = None) -> Response:
        return await answer(lambda: serving.cancel(response_id, tenant(request, cache_salt)))

    @app.get("/v1/responses/{response_id}/input_items", responses=errors)
    async def list_input_items(response_id: str, request: Request, limit: int = 20, order: str = "desc",
                               after: str | None = None, before: str | None = None,
                               cache_salt: str | None = None) -> Response:
        return await answer(lambda: serving.input_items(response_id, tenant(request, cache_salt), limit, order,
                                                        after, before))
