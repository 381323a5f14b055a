"""What crosses the engine boundary: messages in, outputs and typed stats out, and the request checks both
sides share. Imports neither torch nor transformers, so a front end (or another process) that only talks to
the engine stays light.

The front end validates a request with `validate_request` before sending it, so bad input is a synchronous
`ValueError` (HTTP 400); the engine core runs the same check again as its own last word.
"""

import msgspec

from pagedserve.outputs import TokenLogprobs
from pagedserve.sampling_params import SamplingParams

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's upper bound


class ModelLimits(msgspec.Struct, frozen=True):
    """What a request is checked against: the model's vocabulary and the engine's sizes."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    kv_cache_tokens: int  # the whole KV pool, in tokens
    structured_outputs_backend: str = "auto"  # which grammar backend checks and compiles constraints

    @property
    def max_total_tokens(self) -> int:
        """Longest sequence a request may grow to: max_model_len, or the whole KV pool if smaller."""
        return min(self.max_model_len, self.kv_cache_tokens)


def validate_request(limits: ModelLimits, prompt_token_ids: list[int], params: SamplingParams) -> None:
    """What the engine cannot run, as a ValueError naming the field."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty: at least one token is needed")
    vocab = limits.vocab_size
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(prompt_token_ids)}..."
                         f"{max(prompt_token_ids)}")
    num_prompt = len(prompt_token_ids)
    if num_prompt >= limits.max_model_len:
        raise ValueError(f"the prompt has {num_prompt} tokens, but max_model_len is {limits.max_model_len}: "
                         "no room to generate")
    if num_prompt >= limits.kv_cache_tokens:
        raise ValueError(f"the prompt has {num_prompt} tokens, but the whole KV cache holds "
                         f"{limits.kv_cache_tokens}: no room to generate")
    for name, token_ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
        bad = [t for t in token_ids or () if t >= vocab]
        if bad:
            raise ValueError(f"{name} has token id {bad[0]}, outside the vocabulary [0, {vocab})")
    n, seed = params.n, params.seed
    if n > limits.max_num_seqs:
        raise ValueError(f"n={n} samples cannot run together: max_num_seqs is {limits.max_num_seqs}")
    if seed is not None and seed + n - 1 > MAX_SEED:
        raise ValueError(f"sample seeds seed + i must be at most {MAX_SEED}, got seed={seed} with n={n}")


MAX_SESSION_ID_LEN = 256
MAX_RETENTION_S = 3600.0
_INT64 = 2**63


def validate_session(session_id: str | None, kv_retention_s: float | None, priority: int) -> None:
    """The agent-session fields of a request, as a ValueError naming the field."""
    if session_id is not None and not (isinstance(session_id, str) and 0 < len(session_id) <= MAX_SESSION_ID_LEN):
        raise ValueError(f"session_id must be a string of 1 to {MAX_SESSION_ID_LEN} characters, got {session_id!r}")
    if kv_retention_s is not None:
        if isinstance(kv_retention_s, bool) or not isinstance(kv_retention_s, (int, float)) or not (
                0 <= kv_retention_s <= MAX_RETENTION_S):
            raise ValueError(f"kv_retention_s must be a number of seconds in [0, {MAX_RETENTION_S:.0f}], "
                             f"got {kv_retention_s!r}")
        if session_id is None:
            raise ValueError("kv_retention_s needs a session_id: the KV is kept for the session's next request")
    if isinstance(priority, bool) or not isinstance(priority, int) or not -_INT64 <= priority < _INT64:
        raise ValueError(f"priority must be an integer (int64), got {priority!r}")


# ---- front end -> engine ---------------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True):
    """One request, the one record of it from the caller (`LLM`, `AsyncLLM`, a Ray replica) down to the
    engine core: made by `InputProcessor.make_request`, checked by `validate_request` and `validate_session`.

    `session_id`: the agent session it belongs to (its KV is kept for the session's next turn, see
    engine/sessions.py); `kv_retention_s`: how long (None: the engine's guess, 0: not kept); `priority`: lower
    runs first under the priority policy; `cache_salt`: requests with different salts share no cached blocks;
    `prompt`: the prompt's text when it came as text (for the outputs; the engine reads only the ids)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    session_id: str | None = None
    kv_retention_s: float | None = None
    priority: int = 0
    prompt: str | None = None


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]


class StopSamples(msgspec.Struct, tag=True):
    """Samples a stop string ended in the front end, as (request id, index)."""

    samples: list[tuple[str, int]]


class UtilityCall(msgspec.Struct, tag=True):
    """Call an EngineCore method by name (e.g. reset_prefix_cache); the result comes back with an output."""

    call_id: int
    method: str
    args: list[str | None] = []


class Shutdown(msgspec.Struct, tag=True):
    pass


EngineCoreRequest = AddRequest | AbortRequests | StopSamples | UtilityCall | Shutdown


# ---- engine -> front end ---------------------------------------------------------------------------------


class EngineCoreOutput(msgspec.Struct):
    """What one sample of a request got in one step (the caller's request id and the sample's index)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    # With the first token of a request that asked for prompt logprobs: those of prompt positions 1, 2, ...
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    # "input": the request's own data failed it (a grammar that did not compile): the client's error, a 400
    error_kind: str | None = None
    index: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineStats(msgspec.Struct):
    """The engine's state after a step. Counters (`num_preemptions`, `prefix_cache_*`) are cumulative."""

    num_kv_blocks_total: int = 0
    num_kv_blocks_free: int = 0
    block_size: int = 0
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up, once per admission
    prefix_cache_hits: int = 0  # of them, found in the cache
    num_session_leases: int = 0  # sessions whose KV is held across a pause
    num_blocks_leased: int = 0
    lease_hit_tokens: int = 0  # prompt tokens found in a session's lease: not recomputed thanks to it
    leases_evicted: int = 0  # leases cut short under memory pressure
    lease_expiries: int = 0  # leases whose TTL ran out
    # speculative decoding: drafts verified, tokens drafted, of them accepted, and accepted at each draft position
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = []

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_kv_blocks_free / self.num_kv_blocks_total if self.num_kv_blocks_total else 0.0


class UtilityResult(msgspec.Struct):
    call_id: int
    result: bool | EngineStats | None = None
    error: str | None = None  # the call raised


class EngineCoreOutputs(msgspec.Struct):
    outputs: list[EngineCoreOutput]
    stats: EngineStats
    utility_results: list[UtilityResult] = []


class EngineReady(msgspec.Struct):
    """First message from a core process: it has loaded the model (its limits), or failed to (`error`)."""

    limits: ModelLimits | None = None
    error: str | None = None
