"""Prompts in (text, token ids, or chat messages) -> validated prompt token ids, before the engine sees them."""

from transformers import PreTrainedTokenizerBase

from pagedserve.config import EngineConfig

PromptType = str | dict


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = config.hf_config.vocab_size
        self.max_model_len = config.max_model_len

    def __call__(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids); ValueError for a malformed, empty, out-of-vocabulary or too-long prompt."""
        text, token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {min(token_ids)}..."
                             f"{max(token_ids)}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, but max_model_len is {self.max_model_len}: "
                             "no room to generate")
        return text, token_ids

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
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
