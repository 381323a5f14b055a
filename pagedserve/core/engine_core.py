"""The busy loop's body: add_request / abort / step() = schedule -> execute -> sample -> update."""

import logging
from dataclasses import dataclass

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler, SchedulerOutput
from pagedserve.model_executor.model_runner import ModelRunner, ModelRunnerOutput, TokenLogprobs
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve")


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    index: int = 0  # which of the request's n samples this is

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_runner = ModelRunner(config)
        self.kv_cache_manager = KVCacheManager(
            self.model_runner.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_batched_tokens, config.max_num_seqs)
        self.requests: dict[str, Request] = {}
        self.eos_token_id = _eos_token_id(config)

    @property
    def max_total_tokens(self) -> int:
        """Longest sequence a request may grow to: max_model_len, or the whole KV pool if smaller."""
        return min(self.config.max_model_len, self.model_runner.num_kv_blocks * self.config.block_size)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        cache_salt: str | None = None,
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab_size = self.config.hf_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {min(prompt_token_ids)}..."
                             f"{max(prompt_token_ids)}")
        if len(prompt_token_ids) >= self.config.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens, but max_model_len is {self.config.max_model_len}: "
                "no room to generate"
            )
        if sampling_params.n != 1:
            raise ValueError("EngineCore takes n=1 requests; the front end fans n > 1 out")
        if sampling_params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported yet")
        request = Request(
            request_id, list(prompt_token_ids), sampling_params, self.eos_token_id, self.max_total_tokens,
            cache_salt=cache_salt,
        )
        self.requests[request_id] = request
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is not None:
                self._finish(request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        outputs = [self._error_output(r) for r in sched.finished]
        for request in sched.finished:
            self._finish(request, request.status)
        if not sched.scheduled:
            return outputs
        try:
            result = self.model_runner.execute(sched.scheduled)
        except Exception as e:  # an engine fault fails only the requests of this step
            logger.exception("model step failed; failing its %d requests", len(sched.scheduled))
            return outputs + self._fail_step(sched, f"engine error: {e}")
        return outputs + self._update(sched, result)

    def _update(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs = []
        for scheduled in sched.scheduled:
            request = scheduled.request
            request.num_computed_tokens += scheduled.num_new_tokens
            token_id = result.sampled_token_ids.get(request.request_id)
            if token_id is None:  # a prefill chunk that does not reach the end yet
                continue
            request.output_token_ids.append(token_id)
            status = self._check_stop(request, token_id)
            logprobs = result.logprobs.get(request.request_id)
            output = EngineCoreOutput(
                request.request_id, [token_id], [logprobs] if logprobs is not None else None,
                num_cached_tokens=request.num_cached_tokens,
            )
            if status is not None:
                self._finish(request, status)
                output.finish_reason, output.stop_reason = status.finish_reason, request.stop_reason
            outputs.append(output)
        return outputs

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id == request.eos_token_id and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        self.model_runner.release(request.request_id)
        self.requests.pop(request.request_id, None)

    def _fail_step(self, sched: SchedulerOutput, message: str) -> list[EngineCoreOutput]:
        outputs = []
        for scheduled in sched.scheduled:
            request = scheduled.request
            request.error = message
            self._finish(request, RequestStatus.FINISHED_ERROR)
            outputs.append(self._error_output(request))
        return outputs

    @staticmethod
    def _error_output(request: Request) -> EngineCoreOutput:
        return EngineCoreOutput(request.request_id, [], finish_reason="error", error=request.error)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def stats(self) -> dict:
        kv = self.kv_cache_manager
        return {
            "num_kv_blocks_total": kv.pool.num_blocks,
            "num_kv_blocks_free": kv.num_free_blocks,
            "kv_cache_usage": kv.usage(),
            "block_size": kv.block_size,
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "prefix_cache_hit_rate": kv.prefix_cache_hits / kv.prefix_cache_queries if kv.prefix_cache_queries else 0.0,
        }


def _eos_token_id(config: EngineConfig) -> int | None:
    eos = getattr(config.hf_config, "eos_token_id", None)
    if isinstance(eos, list):
        return eos[0] if eos else None
    return eos
