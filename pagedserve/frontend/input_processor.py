"""Prompts in (text, token ids, or chat messages) -> validated prompt token ids, before the engine sees them."""

from transformers import PreTrainedTokenizerBase

from pagedserve.config import EngineConfig
from pagedserve.core.engine_core import validate_request
from pagedserve.sampling_params import SamplingParams

PromptType = str | dict


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def __call__(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids); ValueError for a malformed prompt or one the engine cannot run
        (empty, out-of-vocabulary, too long, n over max_num_seqs, ...)."""
        text, token_ids = self.tokenize(prompt)
        validate_request(self.config, token_ids, params)
        return text, token_ids

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not isinstance(token_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in token_ids):
                raise ValueError("prompt_token_ids must be a list of ints")
            return prompt.get("prompt"), list(token_ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt is a string or a dict with 'prompt' or 'prompt_token_ids', got {prompt!r}")
