"""Text lives here: the tokenizer, chat templates, and incremental detokenization with stop strings."""

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagedserve.config import EngineConfig
from pagedserve.model_executor import gguf_loader
from pagedserve.sampling_params import SamplingParams


def load_tokenizer(config: EngineConfig) -> PreTrainedTokenizerBase:
    if config.tokenizer_path:
        return AutoTokenizer.from_pretrained(config.tokenizer_path, local_files_only=True)
    if config.gguf_path:
        return gguf_loader.load_gguf_tokenizer(config.gguf_path)
    return AutoTokenizer.from_pretrained(config.model_path, local_files_only=True)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one delta per step.

    Text is only emitted once it no longer ends in U+FFFD: a multi-byte character split across tokens
    waits for its last byte. Decoding starts a few tokens back (prefix_offset) so that tokenizers that
    merge spaces across token boundaries still produce the right characters.
    Stop strings are searched in the new text plus a tail long enough to catch one spanning tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.stop_string: str | None = None
        self.max_stop_len = max((len(s) for s in params.stop), default=0)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
        )

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the new text (after stop-string truncation). Sets stop_string if hit."""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return self._append(delta)

    def flush(self) -> str:
        """At the end, emit whatever is still held back (e.g. a dangling partial character)."""
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        if len(full_text) <= len(prefix_text):
            return ""
        return self._append(full_text[len(prefix_text) :])

    def _append(self, delta: str) -> str:
        if self.stop_string is not None:
            return ""
        start = len(self.text)
        self.text += delta
        if self.max_stop_len:
            search_from = max(0, start - self.max_stop_len + 1)
            hits = [(i, stop) for stop in self.params.stop if (i := self.text.find(stop, search_from)) != -1]
            if hits:
                index, stop = min(hits)
                self.stop_string = stop
                end = index + len(stop) if self.params.include_stop_str_in_output else index
                self.text = self.text[:end]
                return self.text[start:]
        return delta
