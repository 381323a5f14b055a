"""SuffixDecoding's proposer (vLLM's `suffix` method; Oliaro et al., NeurIPS 2025, as in arctic-inference).

A draft continues a stretch of text that ends the request and occurred before, in the request's own tokens or in
the outputs of past requests (where an agent's recurring tool calls show up). From the occurrences of the match it
takes the most frequent next token, keeps the occurrences that continue with it, and so on while the product of
those frequencies (the token's estimated probability) stays >= min_token_prob. As arctic-inference does, every
match length is tried and the draft with the most expected accepted tokens (the sum of its probabilities) wins: a
draft is capped by spec_factor * match length and by tree depth - match length, so the longest match is not always
the best one (a 23-token match in a depth-24 tree drafts 1 token at most). The request's own tokens go first; the
cache's draft must score higher.

Instead of arctic-inference's suffix trees (C++), each source is a numpy ring of tokens, searched vectorized: the
positions holding the last token of the context, narrowed by comparing the tokens before them with the context,
give the match length at every occurrence at once, hence the occurrence sets of all match lengths. A suffix trie
of bounded depth in Python would cost a dict entry per token and depth: gigabytes for a 10000-output cache.
- A request's own tokens (RequestTokens) are appended as they come (O(new tokens)) and scanned for the last token
  with one numpy compare (microseconds), rather than indexed: an index's objects per token id would take
  milliseconds to build for a long prompt.
- The cache (OutputCache) keeps, per token id, the positions where it occurs, so a lookup never scans it (a 4-byte
  token and an 8-byte position per token, plus room to grow). Outputs leave in the order they came, so an evicted
  output's positions are the first ones of each of its tokens: eviction costs O(its tokens) and moves nothing.
A lookup looks at the most recent MAX_MATCH_OCCURRENCES occurrences of the last token only, and estimates the
probabilities from the most recent MAX_DRAFT_OCCURRENCES occurrences of a match: its work is bound by those and
the depth, whatever the size of the context and the cache.
"""

from collections import Counter, deque
from collections.abc import Sequence

import numpy as np

from pagedserve.speculative_config import SpeculativeConfig

SEPARATOR = -1  # follows each output in the cache: no match or draft runs from one output into the next
MAX_MATCH_OCCURRENCES = 1024
MAX_DRAFT_OCCURRENCES = 256
COMPARE_BUDGET = 4096  # tokens compared per vectorized step of a match


class Positions:
    """A growable int64 array that drops from the front."""

    def __init__(self) -> None:
        self.data = np.empty(4, np.int64)
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def view(self) -> np.ndarray:
        return self.data[self.start:self.end]

    def append(self, values: list[int]) -> None:
        if self.end + len(values) > len(self.data):
            self._move(2 * (len(self) + len(values)))
        self.data[self.end:self.end + len(values)] = values
        self.end += len(values)

    def drop_front(self, count: int) -> None:
        self.start += count
        if self.start > len(self.data) // 2:  # mostly dropped: free the memory
            self._move(2 * len(self))

    def _move(self, capacity: int) -> None:
        data = np.empty(max(capacity, 4), np.int64)
        data[:len(self)] = self.view()
        self.data, self.start, self.end = data, 0, len(self)


class TokenRing:
    """A source of drafts: tokens at positions [start, end), position p held at tokens[p & (capacity - 1)], so
    dropping the oldest tokens moves nothing. Reads outside [start, end) return junk, which callers mask out."""

    def __init__(self) -> None:
        self.tokens = np.empty(64, np.int32)
        self.start = 0
        self.end = 0

    def occurrences(self, token: int) -> np.ndarray:
        """The positions holding `token` that another token follows, ascending."""
        raise NotImplementedError

    def at(self, positions: np.ndarray) -> np.ndarray:
        return self.tokens[positions & (len(self.tokens) - 1)]

    def extend(self, token_ids: Sequence[int]) -> None:
        if self.end - self.start + len(token_ids) > len(self.tokens):
            held = np.arange(self.start, self.end)
            old = self.at(held)
            self.tokens = np.empty(1 << (2 * (len(held) + len(token_ids)) - 1).bit_length(), np.int32)
            self.tokens[held & (len(self.tokens) - 1)] = old
        self.tokens[np.arange(self.end, self.end + len(token_ids)) & (len(self.tokens) - 1)] = token_ids
        self.end += len(token_ids)

    def match_lengths(self, context: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(ends, lengths): the positions where the last token of context occurs followed by a token (the most
        recent ones, ascending), and how many tokens of context, at most max_length, end at each."""
        ends = self.occurrences(int(context[-1]))[-MAX_MATCH_OCCURRENCES:]
        lengths = np.ones(len(ends), np.int64)
        matching = np.arange(len(ends))  # the occurrences that match all of the `length` last tokens
        backwards = context[::-1]
        length = 1
        while matching.size and length < max_length:
            # compare the next `width` tokens before them at once: one while they are many
            width = min(max_length - length, max(1, COMPARE_BUDGET // matching.size))
            before = ends[matching, None] - np.arange(length, length + width)
            same = (before >= self.start) & (self.at(before) == backwards[length:length + width])
            extra = np.where(same.all(axis=1), width, same.argmin(axis=1))
            lengths[matching] += extra
            matching = matching[extra == width]
            length += width
        return ends, lengths

    def draft(self, ends: np.ndarray, max_tokens: int, min_token_prob: float) -> tuple[list[int], float]:
        """The draft that follows the occurrences ending at `ends`, and its score (the sum of its probabilities)."""
        positions = ends[-MAX_DRAFT_OCCURRENCES:, None] + np.arange(1, max_tokens + 1)
        tokens = self.at(positions)
        going_on = np.logical_and.accumulate((positions < self.end) & (tokens != SEPARATOR), axis=1)
        rows = np.where(going_on, tokens, SEPARATOR).tolist()  # what followed each occurrence
        draft: list[int] = []
        prob, score = 1.0, 0.0
        for column in range(max_tokens):
            nexts = [row[column] for row in rows]
            if SEPARATOR in nexts:  # keep the occurrences that continue
                rows = [row for row, token in zip(rows, nexts) if token != SEPARATOR]
                nexts = [token for token in nexts if token != SEPARATOR]
                if not rows:
                    break
            token = nexts[-1]
            count = nexts.count(token)
            if count < len(nexts):  # they differ: the most frequent next token, ties to the most recent occurrence
                counts = Counter(nexts)
                count = max(counts.values())
                token = next(token for token in reversed(nexts) if counts[token] == count)
                rows = [row for row, next_token in zip(rows, nexts) if next_token == token]
            prob *= count / len(nexts)
            if prob < min_token_prob:
                break
            draft.append(token)
            score += prob
        return draft, score


class RequestTokens(TokenRing):
    """One request's prompt + output so far. It is never trimmed, and a lookup scans it (vectorized): cheaper than
    keeping an index of where each token occurs, whose objects cost more per prompt token than a scan per step."""

    def occurrences(self, token: int) -> np.ndarray:
        return np.flatnonzero(self.tokens[:self.end - 1] == token)


class OutputCache(TokenRing):
    """Past requests' outputs, each followed by SEPARATOR, the most recent max_outputs of them, and for each token
    id the positions where it occurs. Outputs leave in the order they came, so the positions an output takes away
    are the first ones of each of its tokens."""

    def __init__(self, max_outputs: int) -> None:
        super().__init__()
        self.max_outputs = max_outputs
        self.sizes: deque[int] = deque()  # tokens of each output held (its separator included), oldest first
        self.positions: dict[int, Positions] = {}

    def occurrences(self, token: int) -> np.ndarray:
        positions = self.positions.get(token)
        return np.empty(0, np.int64) if positions is None else positions.view()

    def add(self, output_token_ids: list[int]) -> None:
        groups: dict[int, list[int]] = {}  # its last token is not indexed: nothing follows it
        for position, token in enumerate(output_token_ids[:-1], self.end):
            groups.setdefault(token, []).append(position)
        for token, positions in groups.items():
            if token not in self.positions:
                self.positions[token] = Positions()
            self.positions[token].append(positions)
        self.extend([*output_token_ids, SEPARATOR])
        self.sizes.append(len(output_token_ids) + 1)
        if len(self.sizes) > self.max_outputs:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        size = self.sizes.popleft()
        dropped = self.at(np.arange(self.start, self.start + size - 2))  # its last token and separator are not indexed
        tokens, counts = np.unique(dropped, return_counts=True)
        for token, count in zip(tokens.tolist(), counts.tolist()):
            positions = self.positions[token]
            positions.drop_front(count)
            if not len(positions):
                del self.positions[token]
        self.start += size


class SuffixProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.max_depth = config.suffix_decoding_max_tree_depth
        self.max_cached_requests = config.suffix_decoding_max_cached_requests
        # the most tokens a match of each length may draft: spec factor * length, and the tree depth in all
        self.max_draft_by_match = [min(int(config.suffix_decoding_max_spec_factor * length + 1e-6),
                                       self.max_depth - length) for length in range(self.max_depth)]
        self.min_token_prob = config.suffix_decoding_min_token_prob
        self.requests: dict[str, RequestTokens] = {}
        self.cache = OutputCache(config.suffix_decoding_max_cached_requests)

    def propose(self, request_id: str, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to max_tokens draft token ids to follow token_ids (the request's prompt + output so far). Called once
        per engine step for each decoding request; token_ids only grows between calls for one request id (by 1 to
        k+1 tokens). Returns [] when nothing matches well enough."""
        tokens = self.requests.get(request_id)
        if tokens is None:
            tokens = self.requests[request_id] = RequestTokens()
        tokens.extend(token_ids[tokens.end:])
        max_tokens = min(max_tokens, self.num_speculative_tokens, self.max_depth - 1)  # a match has 1 token at least
        if max_tokens <= 0 or not token_ids:
            return []
        context = np.asarray(token_ids[-(self.max_depth - 1):], np.int32)
        draft, score = self._best_draft(tokens, context, max_tokens, [], 0.0)
        draft, _ = self._best_draft(self.cache, context, max_tokens, draft, score)
        return draft

    def finish(self, request_id: str, output_token_ids: list[int]) -> None:
        """The request ended: drop its per-request state; its output goes into the global cache of past outputs
        (bounded by suffix_decoding_max_cached_requests, oldest out first)."""
        self.requests.pop(request_id, None)
        if self.max_cached_requests > 0:
            self.cache.add(output_token_ids)

    def _best_draft(self, source: TokenRing, context: np.ndarray, max_tokens: int, best: list[int],
                    best_score: float) -> tuple[list[int], float]:
        """The best of `best` and the drafts of `source` over all match lengths; a draft must score higher to win."""
        if best_score >= max_tokens:  # a draft scores at most its length
            return best, best_score
        ends, lengths = source.match_lengths(context, len(context))
        # The occurrences that match m tokens or more draft alike for m from one match length found to the next:
        # each such run is tried once, with the m that allows the longest draft, the runs that allow more first.
        found = sorted(set(lengths.tolist()))
        runs = []
        for shortest, longest in zip([1] + [length + 1 for length in found], found):
            cap = min(max_tokens, max(self.max_draft_by_match[shortest:longest + 1]))
            runs.append((cap, longest))
        for cap, longest in sorted(runs, reverse=True):
            if cap <= best_score:
                break
            draft, score = source.draft(ends[lengths >= longest], cap, self.min_token_prob)
            if score > best_score:
                best, best_score = draft, score
        return best, best_score
