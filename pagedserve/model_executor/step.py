"""The contract of one engine step between the engine core and the model runner: what to run
(`SchedulerOutput`, plain per-request data as per-step diffs, vLLM v1's model) and what came back
(`ModelRunnerOutput`).

The scheduler, the engine core and the runner all import this module; it imports no torch (the grammar
bitmask's tensor type is named only for the type checker), so the engine's side of the contract stays light.
"""

from __future__ import annotations

from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve.outputs import TokenLogprobs
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


@dataclass
class GrammarBitmask:
    """A step's token bitmask for the rows that sample under a grammar: `rows[req_id]` is that request's row.
    It is filled on a thread while the forward runs; `tensor()` waits for it."""

    rows: dict[str, int]
    filled: Future[torch.Tensor]  # of the int32 [len(rows), ceil(vocab_size / 32)] CPU tensor

    def tensor(self) -> torch.Tensor:
        return self.filled.result()

    def wait(self) -> None:
        """Until the fill has ended, well or not: then no matcher is read any more."""
        futures.wait([self.filled])


@dataclass
class NewRequestData:
    """A request the runner does not hold: first scheduled, forked from a parent (n > 1), or resumed after
    preemption (then `output_token_ids` are the tokens it had generated, recomputed as part of its prompt)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the runner already holds: from index `block_table_start` on, its block table is now
    `new_block_ids` (appended blocks, and the copy that replaced a shared block, see copy-on-write)."""

    req_id: str
    num_computed_tokens: int
    block_table_start: int
    new_block_ids: list[int]


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # Tokens each scheduled request computes this step, in batch order (starting at its num_computed_tokens).
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # The scheduled requests whose chunk reaches their last token: they sample one (a placeholder until it is back).
    sampling_req_ids: list[str] = field(default_factory=list)
    # Speculative decoding: tokens drafted to follow a sampling request's last token, computed after it in its
    # chunk (counted in num_scheduled_tokens); the runner samples at each and keeps the drafts it agrees with.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Requests the runner must forget: finished (with their sampling state) or preempted (they come back new).
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # (src, dst) block ids to copy in every layer before the forward: copy-on-write of shared blocks.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Token ids a row may not sample this step (EOS and stop ids before min_tokens); set by the engine core.
    banned_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Tokens the grammar-constrained rows that sample this step may take (structured outputs); set by the
    # engine core, and filled while the forward runs.
    grammar_bitmask: GrammarBitmask | None = None


@dataclass
class ModelRunnerOutput:
    # Each sampling request's new tokens: one, or with a draft, the accepted drafted tokens and the one sampled
    # after them.
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # of each new token, if asked for
    # Requests that asked for prompt logprobs and computed part of their prompt: (p, entries), entry i for the
    # prompt token at position p + i (p >= 1: the first prompt token has none).
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
