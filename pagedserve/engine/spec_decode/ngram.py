"""vLLM's `ngram` method (prompt lookup decoding): find the longest n-gram (n in [prompt_lookup_min,
prompt_lookup_max]) that ends the request's text and occurred before, and draft the tokens that followed its most
recent earlier occurrence. Agents' outputs restate their context (tool-call arguments from a tool result, a file
re-emitted with an edit), so the continuation is often right.

The search is vectorized over a numpy copy of the request's tokens that grows with them: the positions holding the
last token, narrowed one earlier token at a time, so a step costs a few array passes however long the history.
"""

import numpy as np

from pagedserve.speculative_config import SpeculativeConfig


class TokenArrays:
    """Each request's prompt + output tokens as a numpy array, extended with only the tokens added since the last
    call (a request's tokens only grow)."""

    def __init__(self) -> None:
        self._arrays: dict[str, tuple[np.ndarray, int]] = {}  # request id -> (buffer, tokens in it)

    def sync(self, request_id: str, token_ids: list[int]) -> np.ndarray:
        buffer, length = self._arrays.get(request_id, (np.empty(0, dtype=np.int64), 0))
        if len(token_ids) > length:
            if len(token_ids) > len(buffer):
                grown = np.empty(max(2 * len(buffer), len(token_ids), 256), dtype=np.int64)
                grown[:length] = buffer[:length]
                buffer = grown
            buffer[length : len(token_ids)] = token_ids[length:]
            length = len(token_ids)
            self._arrays[request_id] = (buffer, length)
        return buffer[:length]

    def drop(self, request_id: str) -> None:
        self._arrays.pop(request_id, None)


def longest_earlier_match(tokens: np.ndarray, max_len: int) -> tuple[int, np.ndarray]:
    """(n, ends): the longest n <= max_len such that the last n tokens also occur ending earlier, and the positions
    where those earlier occurrences end (ascending). (0, empty) if the last token never occurred before."""
    length = len(tokens)
    if length < 2:
        return 0, np.empty(0, dtype=np.int64)
    ends = np.flatnonzero(tokens[: length - 1] == tokens[length - 1])
    n = 1
    while n < max_len and len(ends):
        narrowed = ends[ends >= n]
        narrowed = narrowed[tokens[narrowed - n] == tokens[length - 1 - n]]
        if not len(narrowed):
            break
        ends, n = narrowed, n + 1
    return (n, ends) if len(ends) else (0, ends)


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        assert config.prompt_lookup_min is not None and config.prompt_lookup_max is not None
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self.num_speculative_tokens = config.num_speculative_tokens
        self.tokens = TokenArrays()

    def propose(self, request_id: str, token_ids: list[int], max_tokens: int) -> list[int]:
        tokens = self.tokens.sync(request_id, token_ids)
        n, ends = longest_earlier_match(tokens, self.max_n)
        if n < self.min_n:
            return []
        start = int(ends[-1]) + 1  # the most recent occurrence: what followed it
        return tokens[start : start + min(max_tokens, self.num_speculative_tokens)].tolist()

    def finish(self, request_id: str, output_token_ids: list[int]) -> None:
        self.tokens.drop(request_id)
