"""The busy loop's body: add_request / abort / step() = schedule -> execute -> sample -> update.

A request with n > 1 is n sample `Request`s (ids f"{request_id}#{index}"): the first computes the
prompt, the others fork from its blocks when it is done (see Scheduler.fork). Outputs carry the
caller's request id and the sample's index.

A request with `structured_outputs` waits in the queue until its grammar is compiled (in the background, see
StructuredOutputManager); each step the manager fills the token bitmask of the constrained rows that sample
while the forward runs, and each accepted token advances the sample's matcher; the grammar's end finishes it.

Overlapped scheduling (`async_scheduling`, vLLM's --async-scheduling): the model runs each step on a worker thread,
and the core launches step N+1 behind step N before it takes N's result:

    main thread:  schedule N+1, launch it | complete N: append tokens, stops, outputs | schedule N+2, launch it | ...
    worker:       ...forward N ...........| forward N+1 ...........................................| forward N+2

The scheduler counts tokens as computed when it schedules them, so a decode request of step N is scheduled again in
N+1 before its token is known (a placeholder); the runner, which runs steps one at a time in launch order, feeds it
the token it sampled in N. If the request finishes in N, its N+1 token is dropped. Freeing its blocks at once is
safe: any step that gets them runs after N+1. A step that needs the core to have seen the previous token runs alone
(the pipeline is drained before it and it is completed at once): one with grammar-constrained sampling rows (the
bitmask needs the matcher past the previous token) or with a request whose samples fork after it (n > 1). If a step
fails, the step launched behind it does not run and its requests are recomputed (see _complete).
"""

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

from pagedserve.config import EngineConfig
from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.protocol import (
    AddRequest,
    EngineCoreOutput,
    EngineStats,
    ModelLimits,
    validate_request,
    validate_session,
)
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.scheduler import Scheduler, make_policy
from pagedserve.engine.sessions import session_key
from pagedserve.engine.spec_decode.drafter import Drafter
from pagedserve.engine.structured_output.manager import StructuredOutputManager
from pagedserve.executor import make_executor
from pagedserve.executor.base import Executor, WorkerFailed
from pagedserve.model_executor.step import ModelRunnerOutput, SchedulerOutput
from pagedserve.outputs import TokenLogprobs
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve")


StepOutcome = tuple[ModelRunnerOutput, dict[str, str]] | None  # result, errors (req id -> message); None: not run


@dataclass
class LaunchedStep:
    """A step handed to the model runner, until the core has taken its result (EngineCore._complete)."""

    sched: SchedulerOutput
    # The scheduled requests by id, as they were then: an id may be taken by a new request before the step ends.
    requests: dict[str, Request]
    sampling: list[Request]  # those whose chunk reaches their end: they sample a token
    outcome: Future[StepOutcome] = field(default_factory=Future)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_runner: Executor = make_executor(config)  # a TensorParallelExecutor when split across ranks
        num_blocks = self.model_runner.num_kv_blocks
        self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.sessions = self.kv_cache_manager.sessions
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_batched_tokens, config.max_num_seqs,
                                   make_policy(config.scheduling_policy, self.sessions))
        self.num_arrivals = 0
        self.limits = ModelLimits(
            vocab_size=config.hf_config.vocab_size, max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs, kv_cache_tokens=num_blocks * config.block_size,
            structured_outputs_backend=config.structured_outputs_backend,
        )
        self.requests: dict[str, list[Request]] = {}  # the caller's id -> its unfinished samples
        self.eos_token_ids = config.eos_token_ids
        self.structured_output = StructuredOutputManager(config, self.eos_token_ids)
        self.drafter = Drafter(config.speculative_config) if config.speculative_config else None
        # With async scheduling the forward runs here, and the core keeps one step in flight behind it.
        self.worker = ThreadPoolExecutor(1, "engine-step") if config.async_scheduling else None
        self.in_flight: deque[LaunchedStep] = deque()
        self.step_failed = False  # set by _run when a step fails; later steps are then not run until drained

    def add_request(self, request: AddRequest) -> None:
        """Admit a request (see AddRequest for its fields); ValueError if it breaks the engine's rules."""
        request_id, prompt_token_ids, sampling_params = request.request_id, request.prompt_token_ids, request.params
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        validate_request(self.limits, prompt_token_ids, sampling_params)
        validate_session(request.session_id, request.kv_retention_s, request.priority)
        if sampling_params.structured_outputs is not None:
            self.structured_output.validate(sampling_params.structured_outputs)
        kv_variant = self.model_runner.model.kv_variant(len(prompt_token_ids))
        samples = [
            Request(
                f"{request_id}#{index}", list(prompt_token_ids), _sample_params(sampling_params, index),
                self.eos_token_ids, self.limits.max_total_tokens, cache_salt=request.cache_salt, kv_variant=kv_variant,
                client_request_id=request_id, index=index, session_id=request.session_id,
                kv_retention_s=request.kv_retention_s, priority=request.priority, arrival_index=self.num_arrivals,
            )
            for index in range(sampling_params.n)
        ]
        self.num_arrivals += 1
        if request.session_id is not None:
            self.sessions.on_arrival(session_key(request.session_id, request.cache_salt))
        samples[0].pending_forks = samples[1:]
        self.requests[request_id] = samples
        if sampling_params.structured_outputs is not None:
            self.structured_output.add_request(samples[0])
        self.scheduler.add_request(samples[0])

    def abort_requests(self, request_ids: list[str]) -> None:
        """Abort every sample of each request (unknown or finished ids are ignored)."""
        for request_id in request_ids:
            for sample in list(self.requests.get(request_id, ())):
                self._finish(sample, RequestStatus.FINISHED_ABORTED)

    def stop_samples(self, samples: list[tuple[str, int]]) -> None:
        """Stop single samples, as (request id, index): those a stop string ended in the front end (a normal
        finish: a session keeps its KV)."""
        for request_id, index in samples:
            sample = next((s for s in self.requests.get(request_id, ()) if s.index == index), None)
            if sample is None:
                continue
            if sample.pending_forks:  # the others were to fork from it: the next one computes the prompt
                successor, *rest = sample.pending_forks
                successor.pending_forks, sample.pending_forks = rest, []
                if sample.status == RequestStatus.WAITING_FOR_GRAMMAR:
                    self.structured_output.add_request(successor)
                self.scheduler.add_request(successor)
            self._finish(sample, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.in_flight)

    def step(self) -> list[EngineCoreOutput]:
        outputs = self._admit_compiled()
        if self.drafter is not None:  # every step: it also clears the last step's drafts
            if self.drafter.active(len(self.scheduler.running)):
                outputs += self._drain()  # a draft follows the request's latest token: it must be known
            self.drafter.propose(self.scheduler.running)
            for request in self.scheduler.running:  # a constrained request's draft stops where its grammar does
                if request.spec_token_ids and request.request_id in self.structured_output.matchers:
                    request.spec_token_ids = self.structured_output.valid_draft(request.request_id,
                                                                                request.spec_token_ids)
        sched = self.scheduler.schedule()
        if not sched.num_scheduled_tokens:
            if self.in_flight:
                return outputs + self._drain()
            if self.structured_output.compiling:  # nothing to run until a grammar is ready
                self.structured_output.wait_for_compile(timeout=0.05)
            return outputs
        requests = {req_id: self.scheduler.requests[req_id] for req_id in sched.num_scheduled_tokens}
        step = LaunchedStep(sched, requests, [requests[req_id] for req_id in sched.sampling_req_ids])
        alone = self.worker is None or bool(sched.spec_token_ids) or any(
            r.pending_forks or r.request_id in self.structured_output.matchers for r in step.sampling)
        if alone:
            outputs += self._drain()
        self._launch(step)
        self.in_flight.append(step)
        while len(self.in_flight) > (0 if alone else 1):  # with overlap, the step just launched runs on
            outputs += self._complete(self.in_flight.popleft())
        return outputs

    def _launch(self, step: LaunchedStep) -> None:
        sampling = [r for r in step.sampling if not r.status.finished]  # some may have finished in a drain
        step.sched.banned_token_ids = self._banned_token_ids(sampling)
        # Filled on a thread while the forward runs (the forward releases the GIL); the runner waits for it
        # before sampling.
        step.sched.grammar_bitmask = self.structured_output.start_bitmask([r.request_id for r in sampling],
                                                                          step.sched.spec_token_ids)
        if self.worker is None:
            step.outcome.set_result(self._run(step))
        else:
            step.outcome = self.worker.submit(self._run, step)

    def _run(self, step: LaunchedStep) -> StepOutcome:
        """Run a step in the model runner (on the worker with async scheduling, in launch order). A step launched
        behind one that failed is not run: its inputs may be tokens that were never sampled."""
        self.model_runner.update_states(step.sched)
        if self.step_failed:
            return None
        result, errors = self._execute(step.sched, list(step.sched.num_scheduled_tokens))
        self.step_failed = bool(errors)
        return result, errors

    def _drain(self) -> list[EngineCoreOutput]:
        outputs = []
        while self.in_flight:
            outputs += self._complete(self.in_flight.popleft())
        return outputs

    def _complete(self, step: LaunchedStep) -> list[EngineCoreOutput]:
        """Take a step's result. The requests that broke it fail; then the step launched behind it (which did
        not run) is undone: its requests are recomputed from the start, since they may read K/V (prefix hits)
        the failed step did not write."""
        outcome = step.outcome.result()
        if step.sched.grammar_bitmask is not None:  # the runner waited for it, unless the step failed before sampling
            step.sched.grammar_bitmask.wait()
        if outcome is None:
            for request in step.sampling:  # its token will never come
                request.num_output_placeholders -= 1
            running = [r for r in step.requests.values() if r.status == RequestStatus.RUNNING]
            self.scheduler.requeue(sorted(running, key=self.scheduler.running.index))
            return []
        result, errors = outcome
        outputs = []
        for req_id, message in errors.items():
            request = step.requests[req_id]
            if request.status.finished:  # aborted while the step ran
                continue
            # Blocks this step was to fill may hold stale K/V: they must not be found as prefix hits.
            self.kv_cache_manager.uncache(request)
            outputs += self._fail(request, message)
        outputs += self._update(step, result)
        if errors:
            outputs += self._drain()
            self.step_failed = False
        return outputs

    def _execute(self, sched: SchedulerOutput, req_ids: list[str]) -> tuple[ModelRunnerOutput, dict[str, str]]:
        """Run the step for `req_ids`. If it raises, run each half again, down to single requests: the
        requests whose data caused the fault fail (req id -> message), all the others run as usual."""
        try:
            return self.model_runner.execute(sched, req_ids), {}
        except WorkerFailed:  # the ranks are out of step: no retry can help
            raise
        except Exception as e:
            if len(req_ids) == 1:
                logger.exception("model step failed for request %s; failing it", req_ids[0])
                return ModelRunnerOutput(), {req_ids[0]: f"engine error: {type(e).__name__}: {e}"}
        middle = len(req_ids) // 2
        result, errors = self._execute(sched, req_ids[:middle])
        second, second_errors = self._execute(sched, req_ids[middle:])
        result.sampled_token_ids.update(second.sampled_token_ids)
        result.logprobs.update(second.logprobs)
        result.prompt_logprobs.update(second.prompt_logprobs)
        return result, errors | second_errors

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Requests whose grammar is compiled may now be scheduled; those whose grammar failed fail."""
        outputs = []
        for request, error in self.structured_output.take_compiled():
            if error is None:
                request.status = RequestStatus.WAITING
            else:
                outputs += self._fail(request, error, "input")  # its grammar failed to compile, or in time
        return outputs

    @staticmethod
    def _banned_token_ids(sampling: list[Request]) -> dict[str, list[int]]:
        """EOS and stop token ids may not be sampled before min_tokens are out. The token sampled now is output
        number num_output_tokens + num_output_placeholders (this step's placeholder is the last)."""
        banned = {}
        for request in sampling:
            params = request.sampling_params
            if request.num_output_tokens + request.num_output_placeholders - 1 < params.min_tokens:
                stop_ids = list(cast(list[int], params.stop_token_ids))  # SamplingParams makes it a list
                banned[request.request_id] = stop_ids + list(request.eos_token_ids)
        return banned

    def _update(self, step: LaunchedStep, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs = []
        for req_id, num_new in step.sched.num_scheduled_tokens.items():
            request = step.requests[req_id]
            if request.status.finished:  # failed this step, or finished (stopped, aborted) since it was scheduled
                continue
            if request.session_id is not None:
                self.sessions.add_service(session_key(request.session_id, request.cache_salt), num_new)
            if req_id in result.prompt_logprobs:
                self._add_prompt_logprobs(request, *result.prompt_logprobs[req_id])
            token_ids = result.sampled_token_ids.get(req_id)
            if token_ids is None:  # a prefill chunk that does not reach the end yet
                continue
            request.num_output_placeholders -= 1
            draft = step.sched.spec_token_ids.get(req_id)
            if draft:  # the rejected drafted tokens were counted as computed: take them back, and their blocks
                num_accepted = len(token_ids) - 1
                request.num_computed_tokens -= len(draft) - num_accepted
                self.kv_cache_manager.trim(request)
                assert self.drafter is not None
                self.drafter.record(request, len(draft), num_accepted)
            if request.pending_forks:  # its prompt is computed: its other samples start from its blocks
                self.scheduler.fork(request)
            status, new_token_ids = None, []
            for token_id in token_ids:  # up to a stop: the tokens after it are dropped
                request.output_token_ids.append(token_id)
                new_token_ids.append(token_id)
                status = self._check_stop(request, token_id)
                if status is not None:
                    break
            matcher = self.structured_output.matchers.get(req_id)
            if matcher is not None:
                if not matcher.accept_tokens(new_token_ids):  # the mask allowed only what the grammar takes
                    outputs += self._fail(request, f"structured_outputs: the grammar rejected token {token_ids[0]}")
                    continue
                if matcher.is_terminated():  # it accepted the stop token where the grammar ends
                    status = RequestStatus.FINISHED_STOPPED
            logprobs = result.logprobs.get(req_id)
            output = EngineCoreOutput(
                request.client_request_id, new_token_ids,
                logprobs[: len(new_token_ids)] if logprobs is not None else None,
                num_cached_tokens=request.num_cached_tokens, index=request.index,
            )
            if request.sampling_params.prompt_logprobs is not None and not request.prompt_logprobs_sent \
                    and not request.needs_prompt_logprobs:  # with the first token (a fork computed none: it sends none)
                output.prompt_logprobs, request.prompt_logprobs_sent = request.prompt_logprobs, True
            if status is not None:
                self._finish(request, status)
                output.finish_reason, output.stop_reason = status.finish_reason, request.stop_reason
            outputs.append(output)
        return outputs

    @staticmethod
    def _add_prompt_logprobs(request: Request, first: int, entries: list[TokenLogprobs]) -> None:
        """Keep a chunk's prompt logprobs (entries[i] is of prompt position first + i). A request recomputed after
        preemption computes positions it has again: only the new ones are kept."""
        have = len(request.prompt_logprobs) + 1  # the next position it has none for
        if first <= have:
            request.prompt_logprobs += entries[have - first:]

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in request.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token_id in cast(list[int], params.stop_token_ids):
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        self.structured_output.remove(request.request_id)
        if self.drafter is not None:
            self.drafter.finish(request)
        samples = self.requests.get(request.client_request_id)
        if samples is not None and request in samples:
            samples.remove(request)
            if not samples:
                del self.requests[request.client_request_id]

    def _fail(self, request: Request, message: str, kind: str | None = None) -> list[EngineCoreOutput]:
        """Finish a request with an error, and the samples that were to fork from it (`kind`: see
        EngineCoreOutput.error_kind)."""
        outputs = []
        for sample in [request, *request.pending_forks]:
            sample.error = message
            self._finish(sample, RequestStatus.FINISHED_ERROR)
            outputs.append(EngineCoreOutput(
                sample.client_request_id, [], finish_reason="error", error=message, error_kind=kind,
                index=sample.index,
            ))
        return outputs

    def reset_prefix_cache(self) -> bool:
        self.sessions.expire()  # leases past their TTL first (as in stats, close_session): no step needed for them
        return self.kv_cache_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        """Release what outlives the object: tensor-parallel workers, the step thread."""
        self.model_runner.close()
        if self.worker is not None:
            self.worker.shutdown(wait=False)

    def close_session(self, session_id: str, cache_salt: str | None = None) -> bool:
        """Release what the session holds now (its lease becomes ordinary LRU cache); False if unknown. A session
        is its tenant's: `cache_salt` must be the one its requests gave."""
        self.sessions.expire()
        return self.sessions.close(session_key(session_id, cache_salt))

    def stats(self) -> EngineStats:
        self.sessions.expire()
        kv = self.kv_cache_manager
        return EngineStats(
            num_kv_blocks_total=kv.pool.num_blocks,
            num_kv_blocks_free=kv.num_free_blocks,
            block_size=kv.block_size,
            num_requests_running=len(self.scheduler.running),
            num_requests_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_session_leases=self.sessions.num_leases,
            num_blocks_leased=self.sessions.num_blocks_leased,
            lease_hit_tokens=self.sessions.lease_hit_tokens,
            leases_evicted=self.sessions.leases_evicted,
            lease_expiries=self.sessions.lease_expiries,
            **(self.drafter.stats.as_engine_stats() if self.drafter is not None else {}),
        )


def _sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index` of an n > 1 request: n=1, and seed + index if the request is seeded (as vLLM)."""
    if params.n == 1:
        return params
    sample = params.clone()
    sample.n = 1
    if sample.seed is not None:
        sample.seed += index
    return sample
