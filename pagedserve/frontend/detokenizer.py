"""Incremental detokenization with stop strings: the text of each output, one delta per step."""

from typing import cast

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from pagedserve.sampling_params import SamplingParams


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one delta per step.

    `tokenizers`' `DecodeStream` decodes each new token once (no re-decoding of a window per token) and
    holds back a multi-byte character split across tokens until its last byte arrives.
    Stop strings are searched in the new text plus a tail long enough to catch one spanning tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self.token_ids: list[int] = []
        self.num_decoded_tokens = 0  # tokens whose text is in `text`; the rest wait for a whole character
        self.text = ""
        self.stop_string: str | None = None
        self.stops = cast(list[str], params.stop)  # SamplingParams makes it a list
        self.max_stop_len = max((len(s) for s in self.stops), default=0)

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the new text (after stop-string truncation). Sets stop_string if hit."""
        delta = []
        backend = self.tokenizer.backend_tokenizer
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            piece = self.stream.step(backend, token_id)
            if piece is not None:
                delta.append(piece)
                self.num_decoded_tokens = len(self.token_ids)
        return self._append("".join(delta))

    def flush(self) -> str:
        """At the end, emit whatever is still held back (a dangling partial character becomes U+FFFD)."""
        pending = self.token_ids[self.num_decoded_tokens :]
        self.num_decoded_tokens = len(self.token_ids)
        if not pending:
            return ""
        tail = self.tokenizer.decode(pending, skip_special_tokens=self.params.skip_special_tokens)
        return self._append(cast(str, tail))

    def _append(self, delta: str) -> str:
        if self.stop_string is not None or not delta:
            return ""
        start = len(self.text)
        self.text += delta
        if self.max_stop_len:
            search_from = max(0, start - self.max_stop_len + 1)
            hits = [(i, stop) for stop in self.stops if (i := self.text.find(stop, search_from)) != -1]
            if hits:
                index, stop = min(hits)
                self.stop_string = stop
                end = index + len(stop) if self.params.include_stop_str_in_output else index
                self.text = self.text[:end]
                return self.text[start:]
        return delta
