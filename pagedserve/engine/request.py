"""A request as the engine core sees it: token ids in, token ids out, and where it is in its life."""

import enum
import time
from dataclasses import dataclass, field

from pagedserve.outputs import TokenLogprobs
from pagedserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    WAITING_FOR_GRAMMAR = enum.auto()  # queued, but not to be admitted before its grammar is compiled
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything after this point is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)  # a request is itself: compared by identity (running.remove, `in waiting`)
class Request:
    request_id: str  # unique per sample: the key of its block table and generator
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]  # any of them ends the request (unless ignore_eos)
    max_total_tokens: int  # prompt + output may not exceed this (max_model_len, capped by the KV pool)
    cache_salt: str | None = None
    # Besides the salt, what else makes this request's K/V differ for the same tokens (prefix-cache key).
    kv_variant: tuple = ()
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache, or scheduled to be: the scheduler adds each step's tokens when it
    # schedules them (as vLLM v1), so it can schedule the next step before this one's token is known.
    num_computed_tokens: int = 0
    # Sampled tokens scheduled but not received by the engine core yet: with async scheduling, the token of the
    # step still running is already the input of the step scheduled behind it.
    num_output_placeholders: int = 0
    # Speculative decoding: the tokens drafted to follow it this step (the engine core's drafter sets them before
    # scheduling); the step computes them after its last token and keeps those the model agrees with.
    spec_token_ids: list[int] = field(default_factory=list)
    # Prefix-cache hits found when the request was (last) admitted, in tokens.
    num_cached_tokens: int = 0
    stop_reason: int | str | None = None
    error: str | None = None
    # With sampling_params.prompt_logprobs: those of prompt positions 1, 2, ... as computed so far; sent once whole.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    # The caller's id and which of its n samples this is (EngineCore sets request_id to f"{it}#{index}").
    client_request_id: str = ""
    index: int = 0
    # Samples that start from this one's blocks once its prompt is computed (n > 1; see Scheduler.fork).
    pending_forks: list["Request"] = field(default_factory=list)
    # An agent session: its KV is kept for the session's next turn (a lease) for `kv_retention_s` seconds
    # (None: the engine's guess; 0: not kept), and its service decides its turn under the session policy.
    session_id: str | None = None
    kv_retention_s: float | None = None
    priority: int = 0  # lower runs first under the priority policy (vLLM's)
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_index: int = 0  # order of arrival, the tie-break of every policy

    @property
    def needs_prompt_logprobs(self) -> bool:
        """It asked for prompt logprobs and has not all of them: its prompt must be computed, not found cached."""
        return (self.sampling_params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_output_tokens(self) -> int:
        budget = self.max_total_tokens - self.num_prompt_tokens
        max_tokens = self.sampling_params.max_tokens
        return budget if max_tokens is None else min(max_tokens, budget)
