"""AsyncLLM: the engine behind the server. The engine loop runs in the background (a thread or its own
process, see core_client.py); `generate` is an async iterator of RequestOutputs for one request."""

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

from pagedserve.config import EngineArgs, EngineConfig, create_engine_config
from pagedserve.frontend.core_client import (
    AbortRequests,
    AbortSamples,
    AddRequest,
    EngineCoreOutputs,
    ProcessCoreClient,
    ThreadCoreClient,
    UtilityCall,
)
from pagedserve.frontend.engine_process import EngineProcess, start_engine_process
from pagedserve.frontend.input_processor import InputProcessor, PromptType
from pagedserve.frontend.metrics import LoggingStatLogger, PrometheusMetrics
from pagedserve.frontend.output_processor import OutputProcessor, RequestState
from pagedserve.frontend.tokenizer import load_tokenizer
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("pagedserve")

PLACEMENTS = ("thread", "process")


class AsyncLLM:
    def __init__(
        self,
        engine_args: EngineArgs,
        engine_placement: str = "thread",
        model_name: str = "model",
        log_interval: float = 5.0,
        max_waiting_requests: int | None = None,
        engine_process: EngineProcess | None = None,
    ) -> None:
        """`engine_process`: one already started with these engine_args (placement "process"), so that its
        start-up overlapped the caller's; by default it is started here."""
        if engine_placement not in PLACEMENTS:
            raise ValueError(f"engine_placement must be one of {PLACEMENTS}, got {engine_placement!r}")
        self.config: EngineConfig = create_engine_config(engine_args)
        self.tokenizer = load_tokenizer(self.config)
        self.input_processor = InputProcessor(self.config, self.tokenizer)
        self.processor = OutputProcessor(self.tokenizer)
        self.metrics = PrometheusMetrics(model_name)
        self.stat_logger = LoggingStatLogger(log_interval)
        self.max_waiting_requests = max_waiting_requests
        if engine_placement == "thread":
            self.client = ThreadCoreClient(self.config)
        else:
            self.client = ProcessCoreClient(engine_process or start_engine_process(engine_args))
        self.streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self.pending_calls: dict[int, asyncio.Future] = {}
        self.call_ids = itertools.count()
        self.stats: dict[str, float] = {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage": 0.0}
        self.started = False
        self.errored: str | None = None

    async def start(self) -> None:
        """Start delivering engine outputs on the running event loop (and wait for a core process)."""
        if self.started:
            return
        if isinstance(self.client, ProcessCoreClient):
            await self.client.wait_ready()
        self.client.start(asyncio.get_running_loop(), self._on_core_outputs, self._on_engine_dead)
        self.started = True

    def shutdown(self) -> None:
        self.client.shutdown()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.processor.requests)

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs (cumulative, deltas or final only, per `sampling_params.output_kind`).

        Breaking out of the iteration (or the task being cancelled, e.g. the client went away) aborts the
        request in the engine and frees its blocks.
        """
        await self.start()
        state = self.add_request(prompt, sampling_params, request_id, cache_salt)
        stream = self.streams[request_id]
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self.streams.pop(request_id, None)
            if not finished:
                self.abort(state.request_id)

    def add_request(
        self, prompt: PromptType, params: SamplingParams, request_id: str, cache_salt: str | None = None
    ) -> RequestState:
        """Validate, tokenize and hand the request to the engine; ValueError for bad input, RuntimeError when
        the waiting queue is full or the engine has died."""
        if self.errored:
            raise RuntimeError(f"the engine is not running: {self.errored}")
        if self.max_waiting_requests is not None:
            num_waiting = self.num_unfinished_requests - self.config.max_num_seqs
            if num_waiting >= self.max_waiting_requests:
                raise QueueFullError(
                    f"the server is at capacity: {num_waiting} requests are already waiting "
                    f"(--max-waiting-requests {self.max_waiting_requests}); retry later"
                )
        prompt_text, prompt_token_ids = self.input_processor(prompt, params)
        state = self.processor.add_request(request_id, prompt_text, prompt_token_ids, params)
        self.streams[request_id] = asyncio.Queue()
        self.client.send(AddRequest(request_id, prompt_token_ids, params, cache_salt))
        return state

    def abort(self, request_id: str) -> None:
        """Stop a request now; the engine frees its KV blocks at its next step."""
        if self.processor.abort_request(request_id) is not None:
            self.client.send(AbortRequests([request_id]))

    async def reset_prefix_cache(self) -> bool:
        return await self._call("reset_prefix_cache")

    async def engine_stats(self) -> dict:
        return await self._call("stats")

    async def _call(self, method: str):
        await self.start()
        call_id = next(self.call_ids)
        future = asyncio.get_running_loop().create_future()
        self.pending_calls[call_id] = future
        self.client.send(UtilityCall(call_id, method))
        return await future

    def _on_core_outputs(self, core_outputs: EngineCoreOutputs) -> None:
        """Runs on the event loop for every engine step: detokenize, stream deltas, record metrics."""
        processed = self.processor.process(core_outputs.outputs)
        if processed.to_abort:  # a stop string ended these samples here
            self.client.send(AbortSamples(processed.to_abort))
        for state in processed.updated:
            stream = self.streams.get(state.request_id)
            output = self._output_for(state)
            if stream is not None and output is not None:
                stream.put_nowait(output)
        for state in processed.finished:
            self.metrics.record_finished(state)
        for request_id, message in processed.errors:
            logger.error("request %s failed: %s", request_id, message)
        for call_id, result in core_outputs.utility_results:
            future = self.pending_calls.pop(call_id, None)
            if future is not None and not future.done():
                future.set_result(result)
        self.stats = core_outputs.stats
        self.metrics.record_stats(core_outputs.stats)
        num_generation_tokens = sum(len(o.new_token_ids) for o in core_outputs.outputs)
        self.metrics.record_new_tokens(num_generation_tokens)
        self.stat_logger.record(core_outputs.stats, processed.num_prompt_tokens_computed, num_generation_tokens)

    def _on_engine_dead(self, message: str) -> None:
        """The engine loop is gone: every open request fails now instead of hanging."""
        self.errored = message
        logger.error("the engine died: %s", message)
        for request_id, stream in self.streams.items():
            self.processor.abort_request(request_id)
            stream.put_nowait(RuntimeError(f"the engine died: {message}"))
        for future in self.pending_calls.values():
            if not future.done():
                future.set_exception(RuntimeError(f"the engine died: {message}"))
        self.pending_calls.clear()

    @staticmethod
    def _output_for(state: RequestState) -> RequestOutput | None:
        kind = state.params.output_kind
        if kind == RequestOutputKind.DELTA:
            return state.delta_output()
        if kind == RequestOutputKind.FINAL_ONLY:
            return state.output() if state.finished else None
        return state.output()


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full (the server answers 503)."""
