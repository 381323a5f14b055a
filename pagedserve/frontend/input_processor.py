"""Prompts in (text, token ids, or chat messages) -> validated prompt token ids, before the engine sees them."""

from transformers import PreTrainedTokenizerBase

from pagedserve.engine.protocol import AddRequest, ModelLimits, validate_request, validate_session
from pagedserve.engine.structured_output.backends import choose_backend
from pagedserve.sampling_params import SamplingParams, check_text

PromptType = str | dict


class InputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, limits: ModelLimits | None = None) -> None:
        """`limits` may come later (set the attribute), once the engine has said how large its KV cache is."""
        self.tokenizer = tokenizer
        self.limits = limits

    def __call__(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids); ValueError for a malformed prompt or one the engine cannot run
        (empty, out-of-vocabulary, too long, n over max_num_seqs, a constraint its grammar backend rejects...)."""
        text, token_ids = self.tokenize(prompt)
        self.validate(token_ids, params)
        return text, token_ids

    def make_request(
        self, prompt: PromptType, params: SamplingParams, request_id: str, *, cache_salt: str | None = None,
        session_id: str | None = None, kv_retention_s: float | None = None, priority: int = 0,
    ) -> AddRequest:
        """The request's one record, tokenized and checked (ValueError for bad input): what `AsyncLLM`, a remote
        engine and `LLM` hand on whole. The fields are AddRequest's."""
        validate_session(session_id, kv_retention_s, priority)
        text, token_ids = self(prompt, params)
        return AddRequest(request_id, token_ids, params, cache_salt, session_id, kv_retention_s, priority, text)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if self.limits is None:
            raise RuntimeError("the engine has not started yet")
        validate_request(self.limits, token_ids, params)
        if params.structured_outputs is not None:  # parsed by the engine's backend, not compiled (cached)
            choose_backend(params.structured_outputs, self.limits.structured_outputs_backend)

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not isinstance(token_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in token_ids):
                raise ValueError("prompt_token_ids must be a list of ints")
            return prompt.get("prompt"), list(token_ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.encode(prompt["prompt"])
        raise ValueError(f"a prompt is a string or a dict with 'prompt' or 'prompt_token_ids', got {prompt!r}")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(check_text("the prompt", text), add_special_tokens=add_special_tokens)
