"""The ingress deployment: the single server's FastAPI app (`build_app`, unchanged: same routes, auth, errors)
over a `RemoteEngine`, plus one middleware that says which replica served a request
(`x-pagedserve-replica`) and fetches every replica's series before `/metrics` answers."""

import asyncio

from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.engine_args import EngineArgs
from pagedserve.entrypoints.openai.api_server import build_app
from pagedserve.entrypoints.openai.serving import ServingOptions

from .remote_engine import SERVED_BY, RemoteEngine, ServedBy
from .replica_metrics import ReplicaMetrics

REPLICA_HEADER = b"x-pagedserve-replica"
ROUTING_WAIT_S = 30.0  # a stream's headers wait this long at most for its replica to be known


class ReplicaHeader:
    """Holds a response's start until its first body part, by which time the replica serving it is known
    (whole responses: done; streams: routed, as their first output is fetched at admission)."""

    def __init__(self, app: ASGIApp, metrics: ReplicaMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/metrics":
            await self.metrics.refresh()
        served_by = ServedBy()
        token = SERVED_BY.set(served_by)
        start: Message | None = None

        async def send_with_replica(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if start is not None:
                if not served_by.known.is_set():
                    try:
                        await asyncio.wait_for(served_by.known.wait(), ROUTING_WAIT_S)
                    except TimeoutError:
                        pass
                headers = list(start.get("headers", []))
                if served_by.replicas:
                    headers.append((REPLICA_HEADER, ",".join(served_by.replicas).encode()))
                await send({**start, "headers": headers})
                start = None
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            SERVED_BY.reset(token)


class OpenAIIngress:
    """Ray Serve runs it with `serve.ingress()`: the app is built once the replica handle is here."""

    def __init__(self, replicas: DeploymentHandle, engine_args: EngineArgs, options: ServingOptions,
                 api_key: str | None, max_body_bytes: int) -> None:
        self.engine = RemoteEngine(replicas, engine_args)
        self.options = options
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self) -> ASGIApp:
        app = build_app(self.engine, self.options, self.api_key, self.max_body_bytes)
        app.add_middleware(ReplicaHeader, metrics=self.engine.metrics)
        return app
