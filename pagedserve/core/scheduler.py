"""Continuous batching under a token budget: no prefill and decode phases, one mixed step.

Each step: running requests first (their next token, or next prefill chunk), preempting the newest
running request when blocks run out; then waiting requests in FCFS order while budget, sequence cap
and free blocks allow. The scheduler deals in requests and block ids only, never tensors: a block a
request must copy before writing to it (copy-on-write, n > 1) is a (src, dst) pair for the model runner.
"""

from collections import deque
from dataclasses import dataclass, field

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the request's last token, so its logits give the next token."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests finished at scheduling time (e.g. can never fit in the KV cache).
    finished: list[Request] = field(default_factory=list)
    # (src, dst) block ids to copy in every layer before the forward: copy-on-write of shared blocks.
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.finished


class FCFSPolicy:
    """Admission order: first come, first served; preemption victim: the last admitted running request.

    Running requests are scheduled in admission order, so the victim has not been scheduled this step
    unless it is the request being scheduled itself.
    """

    def pick_victim(self, running: list[Request]) -> Request:
        return running[-1]


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
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preempted = False

        for request in list(self.running):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = self.policy.pick_victim(self.running)
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue
            out.scheduled.append(ScheduledRequest(request, num_new, self.kv.get_block_ids(request.request_id)))
            budget -= num_new

        # Admit waiting requests only if nothing had to be preempted this step. A request's n samples
        # take n of the max_num_seqs seats from its admission on.
        num_seqs = sum(1 + len(r.pending_forks) for r in self.running)
        while self.waiting and budget > 0 and not preempted:
            request = self.waiting[0]
            if num_seqs + 1 + len(request.pending_forks) > self.max_num_seqs:
                break
            if self.kv.num_blocks_needed(request.num_tokens + 1) > self.kv.pool.num_blocks:
                self.waiting.popleft()
                request.status = RequestStatus.FINISHED_ERROR
                request.error = (
                    f"request needs {request.num_tokens + 1} tokens of KV cache, more than the whole pool holds "
                    f"({self.kv.pool.num_blocks} blocks of {self.kv.block_size})"
                )
                out.finished.append(request)
                continue
            hit_blocks, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if not self.kv.allocate_slots(request, num_new, hit_blocks):
                break
            self.kv.record_prefix_lookup(request, num_hit_tokens)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            request.num_cached_tokens = num_hit_tokens
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, self.kv.get_block_ids(request.request_id)))
            budget -= num_new
            num_seqs += 1 + len(request.pending_forks)
        out.block_copies = self.kv.take_block_copies()
        return out

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
            self.running.append(sample)
        request.pending_forks = []

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Finish (stop, length, abort, error) a request wherever it is, and free its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv.forget(request)

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks; it waits at the head of the queue to be recomputed."""
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
