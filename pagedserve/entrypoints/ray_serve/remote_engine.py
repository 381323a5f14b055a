"""The ingress's engine: `AsyncLLM`'s interface, as the OpenAI serving classes use it, over the replica
deployment. Text work (chat template, tokenizing, validation) stays in the ingress, so a bad request is a
400 before any replica sees it; each prompt then goes, as token ids, through a `DeploymentHandle` whose
router (router.py) picks the replica, and its outputs stream back.

Faults: a replica that dies, or refuses the request (its engine down, its queue full), before the request
produced anything gets the request again on another replica (up to `MAX_ATTEMPTS`); one that dies
mid-stream fails the request with `EngineDeadError` (a final SSE error event, or a 503), and the others keep
serving. Ray Serve restarts the dead replica. While no replica answers its health check, `errored` says so:
`/health` and new requests get a 503, as from a single server whose engine died.
"""

import asyncio
import contextvars
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from pagedserve.config import EngineArgs, EngineConfig, create_engine_config
from pagedserve.engine.protocol import AddRequest
from pagedserve.frontend.abort_on_drop import AbortOnDrop
from pagedserve.frontend.async_llm import EngineDeadError, QueueFullError
from pagedserve.frontend.input_processor import InputProcessor
from pagedserve.outputs import RequestOutput
from pagedserve.tokenizer import load_tokenizer

from .replica_metrics import CALL_TIMEOUT_S, ReplicaMetrics
from .router import ReplicaRequest

logger = logging.getLogger("pagedserve")

MAX_ATTEMPTS = 3  # a request no replica started yet is sent again when its replica dies
RETRY_DELAY_S = 0.5
HEALTH_INTERVAL_S = 2.0  # how often the ingress asks the replicas whether any is running


class ServedBy:
    """The replicas serving one HTTP request: known once each of its prompts has been routed."""

    def __init__(self) -> None:
        self.replicas: list[str] = []
        self.pending = 0  # prompts admitted whose replica is not known yet
        self.known = asyncio.Event()
        self.known.set()

    def expect(self) -> None:
        self.pending += 1
        self.known.clear()

    def settle(self, replica: str | None) -> None:
        """One prompt's replica (None: it failed before it was routed)."""
        if replica is not None and replica not in self.replicas:
            self.replicas.append(replica)
        self.pending = max(0, self.pending - 1)
        if self.pending == 0:
            self.known.set()


# Set per HTTP request by the ingress's middleware, which sends the replicas in a response header.
SERVED_BY: contextvars.ContextVar[ServedBy | None] = contextvars.ContextVar("served_by", default=None)
_REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


class _Refused(Exception):
    """A replica refused a request at admission (QueueFullError, EngineDeadError)."""

    def __init__(self, replica: str, cause: Exception) -> None:
        super().__init__(str(cause))
        self.replica = replica
        self.cause = cause


class RemoteEngine:
    """What `build_app` and the serving classes need of an engine, backed by replicas."""

    def __init__(self, handle: DeploymentHandle, engine_args: EngineArgs) -> None:
        self.handle = handle
        self.config: EngineConfig = create_engine_config(engine_args)
        self.tokenizer = load_tokenizer(self.config)
        self.input_processor = InputProcessor(self.tokenizer)
        self.metrics = ReplicaMetrics(handle)
        self.errored: str | None = "the replicas are starting"
        self.watch: asyncio.Task | None = None
        self.responses: dict[str, Any] = {}  # request id -> the replica's response stream, while it runs
        self.failures: dict[str, asyncio.Queue[Exception]] = {}
        self.prefetches: dict[str, asyncio.Future] = {}  # request id -> its stream's first output, being fetched

    async def start(self) -> None:
        response: Any = self.handle.limits.remote()
        limits, replica = await response
        self.input_processor.limits = limits
        self.errored = None
        logger.info("replica %s is ready", replica)
        self.watch = asyncio.create_task(self.watch_replicas())

    async def shutdown(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        self.end_requests("the server is shutting down")

    async def watch_replicas(self) -> None:
        """Keep `errored` (what /health and admission read) true to the replicas: set while none passes its health
        check, cleared as soon as one does again."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            down = await self.replicas_down()
            if down != self.errored:
                log = logger.warning if down else logger.info
                log("replicas: %s", down or "running again")
            self.errored = down

    async def replicas_down(self) -> str | None:
        """None if some replica's engine is running, else why not."""
        try:
            results = await self.handle.broadcast("check_health").results_async(timeout_s=CALL_TIMEOUT_S,
                                                                                return_exceptions=True)
        except Exception as e:  # noqa: BLE001 - whatever it is, no replica answered
            return f"the replicas did not answer: {_first_line(e)}"
        if any(not isinstance(result, BaseException) for result in results):
            return None
        return "no replica is running" + (f" ({_first_line(results[0])})" if results else "")

    # ---- requests -----------------------------------------------------------------------------------

    def check_admission(self) -> None:
        """EngineDeadError while no replica runs; a full queue is each replica's to say (`_Refused`)."""
        if self.errored:
            raise EngineDeadError(f"the engine is not running: {self.errored}")

    def add_request(self, add_request: AddRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request (made by `input_processor.make_request`, so checked against the replicas' limits)
        from whichever replica the router picks."""
        self.check_admission()
        request_id = add_request.request_id
        request = ReplicaRequest(add_request)
        self.failures[request_id] = asyncio.Queue()
        served_by = SERVED_BY.get()
        if served_by is not None:
            served_by.expect()
        stream = EagerStream(self._stream(request, served_by), request_id, self.abort)
        self.prefetches[request_id] = stream.first
        return stream

    async def _stream(self, request: ReplicaRequest,
                      served_by: ServedBy | None) -> AsyncGenerator[RequestOutput, None]:
        started = False
        try:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    async for replica, output in self._attempt(request):
                        if not started and served_by is not None:
                            served_by.settle(replica)
                        started = True
                        yield output
                    return
                except _Refused as e:  # its engine is down or its queue full: another replica may take it
                    if started or attempt == MAX_ATTEMPTS:
                        raise e.cause from None
                    request.avoid = (*request.avoid, e.replica)
                except _REPLICA_GONE as e:
                    if started or attempt == MAX_ATTEMPTS:
                        raise EngineDeadError(f"the replica serving this request died: {_first_line(e)}; the "
                                              "request was not completed") from None
                    logger.warning("request %s: its replica died before it started; sending it again (%s)",
                                   request.request.request_id, _first_line(e))
                    await asyncio.sleep(RETRY_DELAY_S)
        finally:
            if served_by is not None and not started:
                served_by.settle(None)
            self._forget(request.request.request_id)

    async def _attempt(self, request: ReplicaRequest) -> AsyncIterator[tuple[str, RequestOutput]]:
        """One try on one replica: (its id, output) pairs."""
        replica = "?"
        response: Any = self.handle.options(stream=True).generate.remote(request)
        self.responses[request.request.request_id] = response
        failures = self.failures.get(request.request.request_id)
        try:
            iterator = response.__aiter__()
            while True:
                item = await self._next(iterator, failures)
                if item is None:
                    return
                if isinstance(item, str):
                    replica = item
                    logger.debug("request %s (session %s) is served by replica %s", request.request.request_id,
                                request.request.session_id, replica)
                    continue
                yield replica, item
        except RayTaskError as e:  # the replica raised: the engine's own error, as the single server has it
            cause = e.cause if isinstance(e.cause, Exception) else e
            if isinstance(cause, (QueueFullError, EngineDeadError)):
                raise _Refused(replica, cause) from None
            if isinstance(cause, ValueError):
                raise cause from None
            if isinstance(cause, _REPLICA_GONE):
                raise cause from None
            raise EngineDeadError(f"the replica failed the request: {_first_line(cause)}") from None

    @staticmethod
    async def _next(iterator: Any, failures: asyncio.Queue[Exception] | None) -> Any:
        """The next item of the replica's stream, unless `end_requests` ends it first."""
        step = asyncio.ensure_future(iterator.__anext__())
        waits: set[asyncio.Future] = {step}
        failure = asyncio.ensure_future(failures.get()) if failures is not None else None
        if failure is not None:
            waits.add(failure)
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                if not waiting.done():
                    waiting.cancel()
        if failure is not None and failure in done:
            step.cancel()
            raise failure.result()
        try:
            return step.result()
        except StopAsyncIteration:
            return None

    def abort(self, request_id: str) -> None:
        """Stop the request: cancelling the replica's stream aborts it in that replica's engine."""
        self.failures.pop(request_id, None)
        prefetch = self.prefetches.pop(request_id, None)
        if prefetch is not None:
            _stop_prefetch(prefetch)
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self.failures.pop(request_id, None)
        self.prefetches.pop(request_id, None)
        response = self.responses.pop(request_id, None)
        if response is not None:
            response.cancel()

    def end_requests(self, message: str) -> None:
        for request_id, failures in list(self.failures.items()):
            failures.put_nowait(EngineDeadError(message))
            response = self.responses.pop(request_id, None)
            if response is not None:
                response.cancel()

    # ---- calls to every replica ---------------------------------------------------------------------

    async def reset_prefix_cache(self) -> bool:
        results = await self._broadcast("reset_prefix_cache")
        return all(results)

    async def close_session(self, session_id: str, cache_salt: str | None = None) -> bool:
        results = await self._broadcast("close_session", session_id, cache_salt)
        return any(results)

    async def _broadcast(self, method: str, *args: str | None) -> list[Any]:
        try:
            results = await self.handle.broadcast(method, *args).results_async(timeout_s=CALL_TIMEOUT_S)
        except (TimeoutError, *_REPLICA_GONE) as e:
            raise EngineDeadError(f"a replica did not answer {method}: {_first_line(e)}") from None
        if not results:
            raise EngineDeadError("no replica is running")
        return results


class EagerStream:
    """A request's output stream whose first item is fetched from the moment the request is admitted, so it
    is routed (and its replica known, for the response header) before the response starts. Left before it ended
    (closed, its consumer cancelled, or dropped: also never iterated), it aborts the request (`abort`)."""

    def __init__(self, stream: AsyncGenerator[RequestOutput, None], request_id: str,
                 abort: Callable[[str], None]) -> None:
        self.stream = stream
        self.first: asyncio.Future = asyncio.ensure_future(stream.__anext__())
        self.first_taken = False
        self.guard = AbortOnDrop(request_id, abort)

    def __aiter__(self) -> "EagerStream":
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            if not self.first_taken:
                self.first_taken = True
                return await self.first
            return await self.stream.__anext__()
        except BaseException:  # the end, a failure, or its consumer cancelled: nothing of it may stay
            self.guard.close()
            raise

    async def aclose(self) -> None:
        self.guard.close()


def _stop_prefetch(first: asyncio.Future) -> None:
    """A stream's first output will not be read: stop fetching it (the stream's own cleanup aborts the request)."""
    if not first.done():
        first.cancel()
    elif not first.cancelled():
        first.exception()  # retrieved: no "never retrieved" warning


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
