"""The busy loop's body: add_request / abort / step() = schedule -> execute -> sample -> update.

A request with n > 1 is n sample `Request`s (ids f"{request_id}#{index}"): the first computes the
prompt, the others fork from its blocks when it is done (see Scheduler.fork). Outputs carry the
caller's request id and the sample's index.
"""

import logging
from dataclasses import dataclass

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler, SchedulerOutput
from pagedserve.model_executor.layers.rotary import rope_parameters
from pagedserve.model_executor.model_runner import ModelRunner, ModelRunnerOutput, TokenLogprobs
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve")

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's upper bound


def validate_request(config: EngineConfig, prompt_token_ids: list[int], params: SamplingParams) -> None:
    """What the engine cannot run, as a ValueError. Front ends call this too, before a request leaves them."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty: at least one token is needed")
    vocab_size = config.hf_config.vocab_size
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {min(prompt_token_ids)}..."
                         f"{max(prompt_token_ids)}")
    if len(prompt_token_ids) >= config.max_model_len:
        raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens, but max_model_len is {config.max_model_len}: "
                         "no room to generate")
    n, seed = params.n, params.seed
    if n > config.max_num_seqs:
        raise ValueError(f"n={n} samples cannot run together: max_num_seqs is {config.max_num_seqs}")
    if seed is not None and seed + n - 1 > MAX_SEED:
        raise ValueError(f"sample seeds seed + i must be at most {MAX_SEED}, got seed={seed} with n={n}")
    if params.prompt_logprobs is not None:
        raise ValueError("prompt_logprobs is not supported yet")


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
        self.requests: dict[str, list[Request]] = {}  # the caller's id -> its unfinished samples
        self.eos_token_id = _eos_token_id(config)
        rope = rope_parameters(config.hf_config)
        is_longrope = rope["rope_type"] == "longrope"
        self.longrope_original_len = rope["original_max_position_embeddings"] if is_longrope else None

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
        validate_request(self.config, prompt_token_ids, sampling_params)
        samples = [
            Request(
                f"{request_id}#{index}", list(prompt_token_ids), _sample_params(sampling_params, index),
                self.eos_token_id, self.max_total_tokens, cache_salt=cache_salt,
                kv_variant=self._kv_variant(len(prompt_token_ids)), client_request_id=request_id,
                index=index,
            )
            for index in range(sampling_params.n)
        ]
        samples[0].pending_forks = samples[1:]
        self.requests[request_id] = samples
        self.scheduler.add_request(samples[0])

    def _kv_variant(self, prompt_len: int) -> tuple:
        """LongRoPE rotates with its long factors when the prompt is longer than the original context:
        the same tokens then have other K, so they must not share prefix-cache blocks."""
        if self.longrope_original_len is not None and prompt_len > self.longrope_original_len:
            return ("longrope-long",)
        return ()

    def abort_requests(self, request_ids: list[str]) -> None:
        """Abort every sample of each request (unknown or finished ids are ignored)."""
        for request_id in request_ids:
            for sample in list(self.requests.get(request_id, ())):
                self._finish(sample, RequestStatus.FINISHED_ABORTED)

    def abort_samples(self, samples: list[tuple[str, int]]) -> None:
        """Abort single samples, as (request id, index): e.g. the one a stop string ended in the front end."""
        for request_id, index in samples:
            sample = next((s for s in self.requests.get(request_id, ()) if s.index == index), None)
            if sample is None:
                continue
            if sample.pending_forks:  # the others were to fork from it: the next one computes the prompt
                successor, *rest = sample.pending_forks
                successor.pending_forks, sample.pending_forks = rest, []
                self.scheduler.add_request(successor)
            self._finish(sample, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        outputs = []
        for request in sched.finished:
            outputs += self._fail(request, request.error)
        if not sched.scheduled:
            return outputs
        try:
            if sched.block_copies:
                self.model_runner.copy_blocks(sched.block_copies)
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
            if request.pending_forks:  # its prompt is computed: its other samples start from its blocks
                self.scheduler.fork(request)
            request.output_token_ids.append(token_id)
            status = self._check_stop(request, token_id)
            logprobs = result.logprobs.get(request.request_id)
            output = EngineCoreOutput(
                request.client_request_id, [token_id], [logprobs] if logprobs is not None else None,
                num_cached_tokens=request.num_cached_tokens, index=request.index,
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
        samples = self.requests.get(request.client_request_id)
        if samples is not None and request in samples:
            samples.remove(request)
            if not samples:
                del self.requests[request.client_request_id]

    def _fail(self, request: Request, message: str | None) -> list[EngineCoreOutput]:
        """Finish a request with an error, and the samples that were to fork from it."""
        outputs = []
        for sample in [request, *request.pending_forks]:
            sample.error = message
            self._finish(sample, RequestStatus.FINISHED_ERROR)
            outputs.append(EngineCoreOutput(
                sample.client_request_id, [], finish_reason="error", error=message, index=sample.index,
            ))
        return outputs

    def _fail_step(self, sched: SchedulerOutput, message: str) -> list[EngineCoreOutput]:
        outputs = []
        for scheduled in sched.scheduled:
            # Blocks this step was to fill may hold stale K/V: they must not be found as prefix hits.
            self.kv_cache_manager.uncache(scheduled.request)
            outputs += self._fail(scheduled.request, message)
        return outputs

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


def _sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index` of an n > 1 request: n=1, and seed + index if the request is seeded (as vLLM)."""
    if params.n == 1:
        return params
    sample = params.clone()
    sample.n = 1
    if sample.seed is not None:
        sample.seed += index
    return sample


def _eos_token_id(config: EngineConfig) -> int | None:
    eos = getattr(config.hf_config, "eos_token_id", None)
    if isinstance(eos, list):
        return eos[0] if eos else None
    return eos
