"""What the engine hands back to users: vLLM's RequestOutput / CompletionOutput / Logprob."""

from dataclasses import dataclass, field

# Logprobs of one sampled position: token id -> (logprob, rank). The sampled token is always present.
TokenLogprobs = dict[int, tuple[float, int]]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # With finish_reason "error": why, when it was the request's own input (a grammar that did not compile);
    # None for an engine fault (logged by the server, not shown to the client)
    error: str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)
    # With SamplingParams.prompt_logprobs: one entry per prompt token (None for the first, which nothing
    # predicts): its token id -> Logprob (with its rank), plus the top prompt_logprobs alternatives.
    prompt_logprobs: PromptLogprobs | None = None
