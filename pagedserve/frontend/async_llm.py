"""AsyncLLM: the engine behind the server. The engine loop runs in the background (its own process by
default, or a thread; see core_client.py); a request's outputs come back as an async iterator.

If the engine dies, every open request fails at once with a clear error, `errored` says why (the server's
/health answers 503), and the engine is started again after a back-off. If it keeps dying (more than
`max_engine_restarts` deaths in ten minutes) AsyncLLM gives up and calls `on_fatal`, so that the server
exits non-zero and a supervisor can act.
"""

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from pagedserve.config import EngineArgs, EngineConfig, create_engine_config
from pagedserve.engine.process import EngineProcess, start_engine_process
from pagedserve.engine.protocol import (
    AbortRequests,
    AddRequest,
    EngineCoreOutputs,
    EngineStats,
    StopSamples,
    UtilityCall,
)
from pagedserve.frontend.abort_on_drop import AbortOnDrop
from pagedserve.frontend.core_client import ProcessCoreClient, ThreadCoreClient
from pagedserve.frontend.input_processor import InputProcessor, PromptType
from pagedserve.frontend.metrics import LoggingStatLogger, PrometheusMetrics
from pagedserve.frontend.output_processor import OutputProcessor, RequestState
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.tokenizer import load_tokenizer

logger = logging.getLogger("pagedserve")

PLACEMENTS = ("process", "thread")
RESTART_WINDOW_S = 600.0
STARTUP_TIMEOUT_S = 1800.0  # loading a large checkpoint from a slow disk can take minutes
CALL_TIMEOUT_S = 30.0  # a utility call waits for the step in progress, never for a dead engine


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full (the server answers 503)."""


class EngineDeadError(RuntimeError):
    """The engine is not running (it died, or is being restarted); the server answers 503."""


class OutputStream:
    """One request's outputs (`AsyncLLM.add_request`). Left before the request ended, by `aclose`, by its consumer's
    cancellation or by being dropped (before its first output too), it aborts the request in the engine."""

    def __init__(self, request_id: str, queue: asyncio.Queue[RequestOutput | Exception],
                 abort: Callable[[str], None]) -> None:
        self.queue = queue
        self.guard = AbortOnDrop(request_id, abort)

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.guard.closed:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except BaseException:  # cancelled: its consumer is gone
            self.guard.close()
            raise
        if isinstance(item, Exception):
            self.guard.close()
            raise item
        if item.finished:
            self.guard.close()  # the request ended: only its stream is forgotten
        return item

    async def aclose(self) -> None:
        self.guard.close()


class AsyncLLM:
    def __init__(
        self,
        engine_args: EngineArgs,
        engine_placement: str = "process",
        model_name: str = "model",
        log_interval: float = 5.0,
        max_waiting_requests: int | None = None,
        engine_process: EngineProcess | None = None,
        max_engine_restarts: int = 3,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        """`engine_process`: one already started with these engine_args (placement "process"), so that its
        start-up overlapped the caller's; by default it is started here."""
        if engine_placement not in PLACEMENTS:
            raise ValueError(f"engine_placement must be one of {PLACEMENTS}, got {engine_placement!r}")
        self.engine_args = engine_args
        self.placement = engine_placement
        self.config: EngineConfig = create_engine_config(engine_args)
        self.tokenizer = load_tokenizer(self.config)
        self.input_processor = InputProcessor(self.tokenizer)
        self.processor = OutputProcessor(self.tokenizer)
        self.metrics = PrometheusMetrics(model_name)
        self.stat_logger = LoggingStatLogger(log_interval)
        self.max_waiting_requests = max_waiting_requests
        self.max_engine_restarts = max_engine_restarts
        self.on_fatal = on_fatal
        self._first_process = engine_process if engine_placement == "process" else None
        self.client: ProcessCoreClient | ThreadCoreClient | None = None
        self.streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self.pending_calls: dict[int, asyncio.Future] = {}
        self.call_ids = itertools.count()
        self.stats = EngineStats()
        self.errored: str | None = "the engine is starting"
        self.deaths: deque[float] = deque()
        self._start_lock: asyncio.Lock | None = None
        self._restart_task: asyncio.Task | None = None
        self._started = False  # the first start; later ones are restarts after a death
        self._closed = False

    # ---- life cycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine (once) and deliver its outputs on the running event loop. RuntimeError if it
        cannot start."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self._started:
                await self._start_engine()
                self._started = True

    async def _start_engine(self) -> None:
        if self.placement == "process":
            process, self._first_process = self._first_process, None
            # a restarted engine logs at the front end's level (the CLI's --log-level), as the first did
            client: ProcessCoreClient | ThreadCoreClient = ProcessCoreClient(
                process or start_engine_process(self.engine_args, logger.level)
            )
        else:
            client = await asyncio.to_thread(ThreadCoreClient, self.config)
        try:
            self.input_processor.limits = await client.wait_ready(STARTUP_TIMEOUT_S)
        except BaseException:
            await client.shutdown()
            raise
        client.start(asyncio.get_running_loop(), self._on_core_outputs, self._on_engine_dead)
        self.client = client
        self.errored = None

    async def shutdown(self) -> None:
        self._closed = True
        if self._restart_task is not None:
            self._restart_task.cancel()
        self._fail_all("the server is shutting down")
        if self.client is not None:
            await self.client.shutdown()
        elif self._first_process is not None:
            self._first_process.stop()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.processor.requests)

    # ---- requests -----------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        cache_salt: str | None = None,
        session_id: str | None = None,
        kv_retention_s: float | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs (cumulative, deltas or final only, per `sampling_params.output_kind`).

        Breaking out of the iteration (or the task being cancelled, e.g. the client went away) aborts the
        request in the engine and frees its blocks. `session_id` / `kv_retention_s` / `priority`: see
        `EngineCore.add_request`.
        """
        await self.start()
        self.check_admission()  # before the prompt is tokenized
        request = self.input_processor.make_request(
            prompt, sampling_params, request_id, cache_salt=cache_salt, session_id=session_id,
            kv_retention_s=kv_retention_s, priority=priority)
        stream = self.add_request(request)
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()

    def check_admission(self) -> None:
        """EngineDeadError if the engine is not running, QueueFullError if the waiting queue is full: what
        `add_request` would raise now. Callers check it before they tokenize a prompt, too."""
        if self.errored:
            raise EngineDeadError(f"the engine is not running: {self.errored}")
        if self.max_waiting_requests is not None:
            num_waiting = self.num_unfinished_requests - self.config.max_num_seqs
            if num_waiting >= self.max_waiting_requests:
                raise QueueFullError(
                    f"the server is at capacity: {num_waiting} requests are already waiting "
                    f"(--max-waiting-requests {self.max_waiting_requests}); retry later"
                )

    def add_request(self, request: AddRequest) -> OutputStream:
        """Admit a request now (made by `input_processor.make_request`: tokenized and checked) and return its
        output stream.

        Raises at once, before any output: ValueError for a request id in use, QueueFullError when the waiting queue is
        full, EngineDeadError when the engine is not running. A stream left before its request ended (closed, or
        dropped even before its first output) aborts the request.
        """
        self.check_admission()
        request_id = request.request_id
        self.processor.add_request(request_id, request.prompt, request.prompt_token_ids, request.params)
        stream: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self.streams[request_id] = stream
        try:
            assert self.client is not None
            self.client.send(request)
        except BaseException:  # nothing of it may stay behind (a waiting slot, a stream)
            self.processor.abort_request(request_id)
            self.streams.pop(request_id, None)
            raise
        return OutputStream(request_id, stream, self.abort)

    def end_requests(self, message: str) -> None:
        """End every open request now (the server is stopping): aborted in the engine, its stream failed with
        EngineDeadError(message)."""
        for request_id, stream in list(self.streams.items()):
            stream.put_nowait(EngineDeadError(message))
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request now; the engine frees its KV blocks at its next step."""
        self.streams.pop(request_id, None)
        if self.processor.abort_request(request_id) is not None and self.client is not None and not self.errored:
            self.client.send(AbortRequests([request_id]))

    # ---- engine calls -------------------------------------------------------------------------------

    async def reset_prefix_cache(self) -> bool:
        result = await self._call("reset_prefix_cache")
        assert isinstance(result, bool)
        return result

    async def close_session(self, session_id: str, cache_salt: str | None = None) -> bool:
        """Release what the engine holds for the session now; False if it knows no such session under this
        cache_salt (a session is its tenant's)."""
        result = await self._call("close_session", session_id, cache_salt)
        assert isinstance(result, bool)
        return result

    async def engine_stats(self) -> EngineStats:
        result = await self._call("stats")
        assert isinstance(result, EngineStats)
        return result

    async def _call(self, method: str, *args: str | None) -> bool | EngineStats | None:
        """Call an engine method between two steps; EngineDeadError if the engine is not running, or stops
        answering for CALL_TIMEOUT_S seconds."""
        await self.start()
        if self.errored or self.client is None:
            raise EngineDeadError(f"the engine is not running: {self.errored}")
        call_id = next(self.call_ids)
        future = asyncio.get_running_loop().create_future()
        self.pending_calls[call_id] = future
        self.client.send(UtilityCall(call_id, method, list(args)))
        try:
            return await asyncio.wait_for(future, CALL_TIMEOUT_S)
        except TimeoutError:
            raise EngineDeadError(f"the engine did not answer {method} within {CALL_TIMEOUT_S:.0f} s") from None
        finally:
            self.pending_calls.pop(call_id, None)

    # ---- engine outputs and death -------------------------------------------------------------------

    def _on_core_outputs(self, core_outputs: EngineCoreOutputs) -> None:
        """Runs on the event loop for every engine step: detokenize, stream deltas, record metrics."""
        processed = self.processor.process(core_outputs.outputs)
        if processed.to_abort and self.client is not None:  # a stop string ended these samples here
            self.client.send(StopSamples(processed.to_abort))
        if processed.failed and self.client is not None:  # handling their output failed here
            self.client.send(AbortRequests(processed.failed))
        for state in processed.updated:
            stream = self.streams.get(state.request_id)
            output = self._output_for(state)
            if stream is not None and output is not None:
                stream.put_nowait(output)
        for state in processed.finished:
            self.metrics.record_finished(state)
        for request_id, message in processed.errors:
            logger.error("request %s failed: %s", request_id, message)
        for result in core_outputs.utility_results:
            future = self.pending_calls.get(result.call_id)
            if future is not None and not future.done():
                if result.error is not None:
                    future.set_exception(RuntimeError(result.error))
                else:
                    future.set_result(result.result)
        self.stats = core_outputs.stats
        self.metrics.record_stats(core_outputs.stats)
        num_generation_tokens = sum(len(o.new_token_ids) for o in core_outputs.outputs)
        self.metrics.record_new_tokens(num_generation_tokens)
        self.stat_logger.record(core_outputs.stats, processed.num_prompt_tokens_computed, num_generation_tokens)

    def _on_engine_dead(self, message: str) -> None:
        """The engine loop is gone: every open request fails now, then the engine is started again."""
        if self._closed:
            return
        logger.error("the engine died: %s", message)
        self.errored = message
        self._fail_all(f"the engine died: {message}; the request was not completed")
        self.metrics.engine_restarted()
        self.stats = EngineStats()
        dead_client, self.client = self.client, None
        self._restart_task = asyncio.get_running_loop().create_task(self._restart(dead_client))

    def _fail_all(self, message: str) -> None:
        for request_id, stream in list(self.streams.items()):
            self.processor.abort_request(request_id)
            stream.put_nowait(EngineDeadError(message))
        self.streams.clear()
        self.processor.requests.clear()
        for future in self.pending_calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(message))
        self.pending_calls.clear()

    async def _restart(self, dead_client: ProcessCoreClient | ThreadCoreClient | None) -> None:
        if dead_client is not None:
            await dead_client.shutdown()
        while not self._closed:
            now = time.monotonic()
            self.deaths.append(now)
            while self.deaths and now - self.deaths[0] > RESTART_WINDOW_S:
                self.deaths.popleft()
            if len(self.deaths) > self.max_engine_restarts:
                message = (f"the engine died {len(self.deaths)} times in {RESTART_WINDOW_S / 60:.0f} minutes; "
                           f"giving up (last: {self.errored})")
                logger.error(message)
                if self.on_fatal is not None:
                    self.on_fatal(message)
                return
            delay = min(2.0 ** (len(self.deaths) - 1), 30.0)
            logger.warning("restarting the engine in %.0f s (restart %d of at most %d in %.0f minutes)", delay,
                           len(self.deaths), self.max_engine_restarts, RESTART_WINDOW_S / 60)
            await asyncio.sleep(delay)
            try:
                await self._start_engine()
                logger.info("the engine is running again")
                return
            except Exception as e:
                self.errored = f"restart failed: {e}"
                logger.error("the engine failed to restart: %s", e)

    @staticmethod
    def _output_for(state: RequestState) -> RequestOutput | None:
        kind = state.params.output_kind
        if kind == RequestOutputKind.DELTA:
            return state.delta_output()
        if kind == RequestOutputKind.FINAL_ONLY:
            return state.output() if state.finished else None
        return state.output()
