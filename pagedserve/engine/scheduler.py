"""Continuous batching under a token budget: no prefill and decode phases, one mixed step.

Each step: running requests first (their next token, or next prefill chunk), preempting the newest
running request when blocks run out; then waiting requests in FCFS order while budget, sequence cap
and free blocks allow. The scheduler deals in requests and block ids only, never tensors.

What it hands the model runner is plain per-request data, as per-step diffs (vLLM v1's `SchedulerOutput`):
a request the runner has not seen yet (or lost, by preemption) comes whole in `new_requests`; one it
already holds comes as `cached_requests` with only what changed in its block table. The runner keeps the
rest (token ids, sampling state) in its persistent batch and appends the tokens it samples itself.
"""

from __future__ import annotations

import time
from collections import deque

from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.sessions import Sessions, session_key
from pagedserve.model_executor.step import CachedRequestData, NewRequestData, SchedulerOutput


class FCFSPolicy:
    """First come, first served: the waiting queue in arrival order (a preempted request back at its head),
    the running batch in admission order.

    Under every policy the preemption victim is the last request of the running batch, which the policy keeps
    sorted best first: running requests are scheduled in that order, so the victim has not been scheduled this
    step unless it is the request being scheduled itself.
    """

    def sort_waiting(self, waiting: deque[Request], now: float) -> deque[Request]:
        return waiting

    def sort_running(self, running: list[Request]) -> None:
        pass


class PriorityPolicy(FCFSPolicy):
    """vLLM's priority scheduling: lower `priority` first, then arrival order, in the queue and the batch."""

    def sort_waiting(self, waiting: deque[Request], now: float) -> deque[Request]:
        return deque(sorted(waiting, key=self._key))

    def sort_running(self, running: list[Request]) -> None:
        running.sort(key=self._key)

    @staticmethod
    def _key(request: Request) -> tuple[int, int]:
        return request.priority, request.arrival_index


class SessionPolicy(FCFSPolicy):
    """Program-level scheduling (Autellix's PLAS): the session that has had the least service so far (tokens
    computed for it) goes first, so a short agent program is not stuck behind a long one; arrival order within
    a session. A new session starts at the live sessions' average service, not at zero: a fresh id is no free
    pass to the head of the queue. A request without a session is a program of its own, started there too. A
    waiting request's service counts AGING_TOKENS_PER_S fewer tokens per second it has waited, which bounds
    starvation."""

    AGING_TOKENS_PER_S = 1000.0

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def sort_waiting(self, waiting: deque[Request], now: float) -> deque[Request]:
        return deque(sorted(waiting, key=lambda r: (
            self._service(r) - self.AGING_TOKENS_PER_S * (now - r.arrival_time), r.arrival_index)))

    def sort_running(self, running: list[Request]) -> None:
        running.sort(key=lambda r: (self._service(r), r.arrival_index))

    def _service(self, request: Request) -> int:
        if request.session_id is None:
            return self.sessions.average_service() + request.num_computed_tokens
        return self.sessions.attained_service(session_key(request.session_id, request.cache_salt))


def make_policy(name: str, sessions: Sessions) -> FCFSPolicy:
    if name == "priority":
        return PriorityPolicy()
    if name == "session":
        return SessionPolicy(sessions)
    if name != "fcfs":
        raise ValueError(f"scheduling_policy must be one of fcfs, priority, session, got {name!r}")
    return FCFSPolicy()


class Scheduler:
    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        policy: FCFSPolicy | None = None,
    ) -> None:
        self.kv = kv_cache_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.policy = policy or FCFSPolicy()
        self.requests: dict[str, Request] = {}  # every unfinished sample, by its request_id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._held_by_runner: set[str] = set()  # requests the runner has in its persistent batch
        self._finished_req_ids: set[str] = set()  # since the last step, to tell the runner
        self._preempted_req_ids: set[str] = set()

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preempted = False
        self.kv.sessions.expire()
        self.policy.sort_running(self.running)
        self.waiting = self.policy.sort_waiting(self.waiting, time.monotonic())

        for request in list(self.running):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if request.num_output_tokens + request.num_output_placeholders >= request.max_output_tokens:
                continue  # its last token is being sampled in a step still running (async scheduling)
            num_new = min(request.num_tokens + request.num_output_placeholders - request.num_computed_tokens, budget)
            if request.spec_token_ids:  # a draft rides along if there is budget and room for it
                del request.spec_token_ids[budget - 1:]
                if not self.kv.allocate_slots(request, 1 + len(request.spec_token_ids)):
                    request.spec_token_ids = []
                num_new += len(request.spec_token_ids)
            while not request.spec_token_ids and not self.kv.allocate_slots(request, num_new):
                victim = self.running[-1]  # the worst by the policy (see FCFSPolicy)
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue
            self._add_to_output(out, request, num_new)
            budget -= num_new

        # Admit waiting requests only if nothing had to be preempted this step. A request's n samples
        # take n of the max_num_seqs seats from its admission on.
        num_seqs = sum(1 + len(r.pending_forks) for r in self.running)
        skipped: list[Request] = []  # still waiting for their grammar: the requests behind them go first
        while self.waiting and budget > 0 and not preempted:
            request = self.waiting[0]
            if request.status == RequestStatus.WAITING_FOR_GRAMMAR:
                skipped.append(self.waiting.popleft())
                continue
            if num_seqs + 1 + len(request.pending_forks) > self.max_num_seqs:
                break
            hit_blocks, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if not self.kv.allocate_slots(request, num_new, hit_blocks):
                break
            self.kv.record_prefix_lookup(request, num_hit_tokens)
            if request.session_id is not None:  # its hits hold their own references now: the lease can go
                self.kv.sessions.claim(session_key(request.session_id, request.cache_salt), hit_blocks)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            request.num_cached_tokens = num_hit_tokens
            self.running.append(request)
            self._add_to_output(out, request, num_new)
            budget -= num_new
            num_seqs += 1 + len(request.pending_forks)
        self.waiting.extendleft(reversed(skipped))

        out.block_copies = self.kv.take_block_copies()
        if out.num_scheduled_tokens:  # an empty step is not run: the runner hears of these with the next one
            out.finished_req_ids, self._finished_req_ids = self._finished_req_ids, set()
            out.preempted_req_ids, self._preempted_req_ids = self._preempted_req_ids, set()
        return out

    def _add_to_output(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        """Schedule `num_new` tokens of the request, and count them as computed from now on: a step that reaches
        its end samples a token the engine core gets later (a placeholder until then). A draft's tokens are
        scheduled after the last one; the engine core takes back those the model rejects (see EngineCore._update)."""
        req_id = request.request_id
        out.num_scheduled_tokens[req_id] = num_new
        start = self.kv.take_table_change(req_id)
        if req_id not in self._held_by_runner:
            self._held_by_runner.add(req_id)
            out.new_requests.append(NewRequestData(
                req_id, request.prompt_token_ids, list(request.output_token_ids), request.sampling_params,
                self.kv.get_block_ids(req_id), request.num_computed_tokens,
            ))
        else:
            new_block_ids = self.kv.get_block_ids(req_id)[start:] if start is not None else []
            out.cached_requests.append(CachedRequestData(
                req_id, request.num_computed_tokens, start if start is not None else 0, new_block_ids,
            ))
        request.num_computed_tokens += num_new
        num_drafted = len(request.spec_token_ids)
        if num_drafted:
            out.spec_token_ids[req_id] = list(request.spec_token_ids)
        if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders + num_drafted:
            request.num_output_placeholders += 1
            out.sampling_req_ids.append(req_id)

    def fork(self, request: Request) -> None:
        """Start a request's other samples once its prompt is computed (n > 1).

        They share its blocks and each computes the prompt's last token again, in a row of its own, to
        sample its own first token; writing that token copies the shared last block (copy-on-write).
        """
        for sample in request.pending_forks:
            self.kv.fork(request, sample)
            sample.status = RequestStatus.RUNNING
            sample.num_computed_tokens = request.num_prompt_tokens - 1
            sample.num_cached_tokens = request.num_cached_tokens
            self.requests[sample.request_id] = sample
            self.running.append(sample)
        request.pending_forks = []

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Finish (stop, length, abort, error) a request wherever it is, and free its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        finished_well = status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
        if finished_well and request.session_id is not None:
            self.kv.retain(request)  # kept warm for the session's next turn (an aborted or failed one is not)
        else:
            self.kv.forget(request)
        self.requests.pop(request.request_id, None)
        self._preempted_req_ids.discard(request.request_id)
        self._held_by_runner.discard(request.request_id)
        self._finished_req_ids.add(request.request_id)

    def requeue(self, requests: list[Request]) -> None:
        """Recompute these running requests from the start: a step scheduled for them did not run (see
        EngineCore._complete). Preempted last first, so they keep their order at the head of the queue."""
        for request in reversed(requests):
            self._preempt(request)

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks; it waits at the head of the queue to be recomputed."""
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        if request.request_id in self._held_by_runner:
            self._held_by_runner.discard(request.request_id)
            self._preempted_req_ids.add(request.request_id)
