"""Engine-core outputs (token ids) -> what users see (text, logprobs, finish reasons), per sample.

Shared by `LLM` (which keeps the final, cumulative outputs) and `AsyncLLM` (which streams deltas).
Stop strings end a sample here, in the front end; the caller aborts it in the core. So does a fault in
handling one request's output (detokenizing it, decoding a logprob): that request alone fails, with
finish_reason "error", as when the engine fails it.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import cast

from transformers import PreTrainedTokenizerBase

from pagedserve.engine.protocol import EngineCoreOutput
from pagedserve.frontend.detokenizer import IncrementalDetokenizer
from pagedserve.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, SampleLogprobs, TokenLogprobs
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve")


@dataclass
class SampleState:
    """One of a request's n samples."""

    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    input_error: str | None = None  # an error the request's own input caused: the client is told
    # How much has been handed out as deltas (streaming).
    num_sent_chars: int = 0
    num_sent_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            self.index, self.detokenizer.text, list(self.token_ids), self.cumulative_logprob, self.logprobs,
            self.finish_reason, self.stop_reason, self.input_error,
        )

    def delta(self, hold_back: int) -> CompletionOutput | None:
        """What is new since the last delta; None if nothing is. Text that could still turn out to be
        the start of a stop string (`hold_back` characters) waits until the sample moves past it or ends."""
        text = self.detokenizer.text
        end = len(text) if self.finished else max(self.num_sent_chars, len(text) - hold_back)
        new_tokens = self.token_ids[self.num_sent_tokens :]
        if end == self.num_sent_chars and not new_tokens and not self.finished:
            return None
        logprobs = self.logprobs[self.num_sent_tokens :] if self.logprobs is not None else None
        out = CompletionOutput(
            self.index, text[self.num_sent_chars : end], new_tokens, self.cumulative_logprob, logprobs,
            self.finish_reason, self.stop_reason, self.input_error,
        )
        self.num_sent_chars, self.num_sent_tokens = end, len(self.token_ids)
        return out


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_cached_tokens: int = 0
    num_generation_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # once the engine sent them (with the first token)
    prompt_logprobs_sent: bool = False  # in a delta

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    def output(self) -> RequestOutput:
        """The cumulative output so far."""
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, [s.completion() for s in self.samples],
            self.finished, self.metrics(), self.prompt_logprobs,
        )

    def delta_output(self) -> RequestOutput | None:
        """Only what changed since the last delta (for streaming); None if nothing did. The prompt logprobs come
        in the first delta that has them."""
        hold_back = self.params.output_text_buffer_length
        deltas = [d for s in self.samples if (d := s.delta(hold_back)) is not None]
        if not deltas:
            return None
        prompt_logprobs = None if self.prompt_logprobs_sent else self.prompt_logprobs
        self.prompt_logprobs_sent = prompt_logprobs is not None
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, deltas, self.finished,
                             self.metrics(), prompt_logprobs)

    def metrics(self) -> dict:
        return {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                "last_token_time": self.last_token_time, "num_cached_tokens": self.num_cached_tokens}


@dataclass
class ProcessedOutputs:
    updated: list[RequestState]  # requests that got something new this step (in order of first update)
    finished: list[RequestState]  # requests whose last sample finished this step
    to_abort: list[tuple[str, int]]  # (request id, sample index) that a stop string ended: abort in the core
    errors: list[tuple[str, str]]  # (request id, message) of samples the engine failed
    failed: list[str] = field(default_factory=list)  # requests whose output could not be handled: abort in the core
    num_prompt_tokens_computed: int = 0  # prompt tokens (less prefix-cache hits) of requests that got their first token


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> RequestState:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        samples = [SampleState(i, IncrementalDetokenizer(self.tokenizer, params)) for i in range(params.n)]
        if params.logprobs is not None:
            for sample in samples:
                sample.logprobs, sample.cumulative_logprob = [], 0.0
        state = RequestState(request_id, prompt, prompt_token_ids, params, samples)
        self.requests[request_id] = state
        return state

    def abort_request(self, request_id: str) -> RequestState | None:
        """Forget a request (e.g. its client went away); its samples end with finish_reason "abort"."""
        state = self.requests.pop(request_id, None)
        if state is not None:
            for sample in state.samples:
                if not sample.finished:
                    sample.finish_reason = "abort"
        return state

    def process(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        result = ProcessedOutputs([], [], [], [])
        updated: dict[str, RequestState] = {}
        now = time.monotonic()
        for core_out in core_outputs:
            state = self.requests.get(core_out.request_id)
            if state is None:  # aborted meanwhile
                continue
            sample = state.samples[core_out.index]
            if sample.finished:
                continue
            if state.first_token_time is None and core_out.new_token_ids:
                result.num_prompt_tokens_computed += len(state.prompt_token_ids) - core_out.num_cached_tokens
            try:
                if self._apply(state, sample, core_out, now):
                    result.to_abort.append((state.request_id, sample.index))
            except Exception as e:
                logger.exception("request %s failed: handling its output raised", state.request_id)
                self._fail(state, f"handling its output failed: {type(e).__name__}: {e}")
                result.failed.append(state.request_id)
            if core_out.error:
                result.errors.append((state.request_id, core_out.error))
            updated[state.request_id] = state
            if state.finished:
                del self.requests[state.request_id]
                result.finished.append(state)
        result.updated = list(updated.values())
        return result

    @staticmethod
    def _fail(state: RequestState, message: str) -> None:
        for sample in state.samples:
            if not sample.finished:
                sample.finish_reason, sample.stop_reason, sample.error = "error", None, message

    def _decoded(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        return {token_id: Logprob(lp, rank, cast(str, self.tokenizer.decode([token_id])))
                for token_id, (lp, rank) in entry.items()}

    def _apply(self, state: RequestState, sample: SampleState, core_out: EngineCoreOutput, now: float) -> bool:
        """Fold one core output into its sample; True when a stop string ended it (abort it in the core)."""
        new_token_ids = core_out.new_token_ids
        text_token_ids = new_token_ids
        if core_out.finish_reason == "stop" and not state.params.include_stop_str_in_output:
            text_token_ids = new_token_ids[:-1]  # EOS / a stop token id is not part of the text (as vLLM)
        if len(text_token_ids) > 1 and sample.detokenizer.stops:
            # Several tokens in one step (an accepted draft): the output ends at the token that completes a stop
            # string, as it would have without the draft.
            for count, token_id in enumerate(text_token_ids, 1):
                sample.detokenizer.add_tokens([token_id])
                if sample.detokenizer.stop_string is not None:
                    new_token_ids = new_token_ids[:count]
                    break
        else:
            sample.detokenizer.add_tokens(text_token_ids)
        if new_token_ids:
            if state.first_token_time is None:
                state.first_token_time = now
                state.num_cached_tokens = core_out.num_cached_tokens
            state.last_token_time = now
            state.num_generation_tokens += len(new_token_ids)
        sample.token_ids += new_token_ids
        if core_out.prompt_logprobs is not None and state.prompt_logprobs is None:
            state.prompt_logprobs = [None, *map(self._decoded, core_out.prompt_logprobs)]
        if core_out.new_logprobs is not None and sample.logprobs is not None:
            new_logprobs = core_out.new_logprobs[: len(new_token_ids)]
            sample.logprobs += map(self._decoded, new_logprobs)
            sampled = sum(entry[t][0] for entry, t in zip(new_logprobs, new_token_ids))
            sample.cumulative_logprob = (sample.cumulative_logprob or 0.0) + sampled
        if core_out.finished:
            sample.detokenizer.flush()
        if sample.detokenizer.stop_string is not None:
            sample.finish_reason, sample.stop_reason = "stop", sample.detokenizer.stop_string
            return not core_out.finished
        if core_out.finished:
            sample.finish_reason, sample.stop_reason = core_out.finish_reason, core_out.stop_reason
            sample.error = core_out.error
            if core_out.error_kind == "input":
                sample.input_error = core_out.error
        return False
