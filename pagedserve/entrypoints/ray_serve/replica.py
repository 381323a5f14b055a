"""One engine replica: a Ray Serve deployment holding one `AsyncLLM` (its own engine, its own KV pool).

It runs token ids the ingress already tokenized and validated, streams the engine's outputs back (first its
own id, so the ingress can say which replica served a request), answers Serve's health checks from the
engine's state, and on shutdown (after Serve's graceful drain) ends what is still open and stops its engine.
"""

from collections.abc import AsyncIterator

from prometheus_client import generate_latest
from ray import serve

from pagedserve.engine.protocol import ModelLimits
from pagedserve.engine_args import EngineArgs
from pagedserve.frontend.async_llm import AsyncLLM
from pagedserve.outputs import RequestOutput

from .router import ReplicaRequest


class EngineReplica:
    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self, engine_args: EngineArgs, model_name: str, engine_placement: str = "thread",
        max_waiting_requests: int | None = None, log_interval: float = 5.0,
    ) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.engine = AsyncLLM(engine_args, engine_placement, model_name, log_interval, max_waiting_requests)
        await self.engine.start()

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[str | RequestOutput]:
        """This replica's id, then the request's outputs. Admission errors (400, 503) are raised as they are."""
        yield self.replica_id
        stream = self.engine.add_request(request.request)
        async for output in stream:
            yield output

    async def limits(self) -> tuple[ModelLimits, str]:
        """What the ingress validates prompts against, and who answered."""
        assert self.engine.input_processor.limits is not None
        return self.engine.input_processor.limits, self.replica_id

    # ---- called on every replica (DeploymentHandle.broadcast) -------------------------------------------

    async def metrics_text(self) -> tuple[str, str]:
        return self.replica_id, generate_latest(self.engine.metrics.registry).decode()

    async def reset_prefix_cache(self) -> bool:
        return await self.engine.reset_prefix_cache()

    async def close_session(self, session_id: str, cache_salt: str | None = None) -> bool:
        return await self.engine.close_session(session_id, cache_salt)

    async def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine is down (and did not come back by itself)."""
        if self.engine.errored:
            raise RuntimeError(f"the engine is not running: {self.engine.errored}")

    async def __del__(self) -> None:
        self.engine.end_requests("the replica is shutting down")
        await self.engine.shutdown()
