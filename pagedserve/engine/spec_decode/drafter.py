"""The engine core's side of speculative decoding: before each step, a draft for every request that decodes, from
the configured proposer; after it, what was accepted, for the adaptive rules and the metrics.

Adaptive, so speculation runs only where it pays, since every drafted token costs a row of the step's work:
- a request's drafts are at most 1 + twice its recent mean of accepted tokens (so k shrinks where drafts miss);
- a request whose drafts miss twice in a row stops drafting for RETRY_STEPS steps, twice as long after each further
  miss (up to MAX_PAUSE_STEPS): a request whose drafts never hit costs a short draft every few hundred steps;
- a step's decode tokens and drafts together stay within `max_tokens_per_step`, shared out evenly, and a step of
  more than `disable_by_batch_size` requests drafts nothing: past a few dozen rows a step is bound by compute, so
  drafted rows cost as much as real ones instead of riding on one read of the weights."""

from dataclasses import dataclass, field

from pagedserve.engine.request import Request
from pagedserve.engine.spec_decode.ngram import NgramProposer
from pagedserve.engine.spec_decode.suffix import SuffixProposer
from pagedserve.speculative_config import SpeculativeConfig

RETRY_STEPS = 16
MAX_PAUSE_STEPS = 256


@dataclass
class DraftStats:
    """Cumulative counts, vLLM's spec_decode metrics: drafts proposed, tokens drafted, tokens accepted, and tokens
    accepted at each draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def as_engine_stats(self) -> dict:
        """The EngineStats fields of these counts."""
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_accepted_per_position": list(self.accepted_per_position)}


@dataclass
class _RequestTrack:
    mean_accepted: float  # moving average of the tokens accepted per draft (half the past, half the last)
    misses: int = 0  # drafts in a row with no token accepted
    paused_steps: int = 0  # steps left before a request whose drafts missed tries again

    @property
    def max_draft(self) -> int:
        return 1 + int(2 * self.mean_accepted)


class Drafter:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.proposer = NgramProposer(config) if config.method == "ngram" else SuffixProposer(config)
        self.stats = DraftStats(accepted_per_position=[0] * config.num_speculative_tokens)
        self._tracks: dict[str, _RequestTrack] = {}

    def active(self, num_running: int) -> bool:
        """Whether this step drafts at all (the engine core then runs it without overlap: drafts need the
        previous step's tokens)."""
        limit = self.config.disable_by_batch_size
        return 0 < num_running and (limit is None or num_running <= limit)

    def propose(self, running: list[Request]) -> None:
        """Set `spec_token_ids` of each running request that decodes next (its tokens all known, one to
        compute); clear everyone's last drafts first, also in a step that drafts nothing (not active)."""
        for request in running:
            request.spec_token_ids = []
        if not self.active(len(running)):
            return
        decoding = [r for r in running if not r.num_output_placeholders and r.num_computed_tokens == r.num_tokens - 1]
        drafting = []
        for request in decoding:
            track = self._track(request)
            if track.paused_steps:
                track.paused_steps -= 1
            else:
                drafting.append(request)
        if not drafting:
            return
        share = (self.config.max_tokens_per_step - len(decoding)) // len(drafting)
        for request in drafting:
            max_tokens = min(self._max_draft(request), self._track(request).max_draft, share)
            if max_tokens > 0:
                request.spec_token_ids = self.proposer.propose(request.request_id, request.all_token_ids, max_tokens)

    def _max_draft(self, request: Request) -> int:
        """Drafted tokens plus the one sampled after them may not pass max_tokens or the model's length, and all of
        them sample under the same bans: before min_tokens is out, drafts stop short of it."""
        room = min(request.max_output_tokens - request.num_output_tokens,
                   request.max_total_tokens - request.num_tokens) - 1
        min_tokens = request.sampling_params.min_tokens
        if request.num_output_tokens < min_tokens:
            room = min(room, min_tokens - request.num_output_tokens - 1)
        return min(room, self.config.num_speculative_tokens)

    def record(self, request: Request, num_drafted: int, num_accepted: int) -> None:
        """A verified draft: count it, and pause the request's drafting if its drafts keep missing."""
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafted
        stats.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.accepted_per_position[position] += 1
        track = self._track(request)
        track.mean_accepted = (track.mean_accepted + num_accepted) / 2
        track.misses = 0 if num_accepted else track.misses + 1
        if track.misses >= 2:
            track.paused_steps = min(RETRY_STEPS << (track.misses - 2), MAX_PAUSE_STEPS)

    def _track(self, request: Request) -> _RequestTrack:
        track = self._tracks.get(request.request_id)
        if track is None:  # a first draft may be whole
            track = self._tracks[request.request_id] = _RequestTrack(self.config.num_speculative_tokens / 2)
        return track

    def finish(self, request: Request) -> None:
        self._tracks.pop(request.request_id, None)
        self.proposer.finish(request.request_id, request.output_token_ids)
