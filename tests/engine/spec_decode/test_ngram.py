"""The ngram proposer (prompt lookup): the longest n-gram in [min, max] that ends the text and occurred before,
the tokens after its most recent earlier occurrence, capped; incremental use equals a fresh look."""

import random
import time

import numpy as np

from pagedserve.engine.spec_decode.ngram import NgramProposer, longest_earlier_match
from pagedserve.speculative_config import SpeculativeConfig


def proposer(k: int = 4, low: int = 1, high: int = 3) -> NgramProposer:
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": low,
                                          "prompt_lookup_max": high})
    assert config is not None
    return NgramProposer(config)


def test_drafts_what_followed_the_longest_match():
    # [2, 3] occurs ending at 9 (followed by 4) and [8, 2, 3] at 13 (followed by 9): the longer match wins
    tokens = [1, 2, 3, 4, 5, 8, 2, 3, 9, 7, 6, 8, 2, 3]
    assert proposer().propose("a", tokens, 10) == [9, 7, 6, 8]


def test_the_most_recent_occurrence_of_a_match_wins():
    tokens = [5, 6, 1, 9, 5, 6, 2, 9, 5, 6]
    assert proposer(k=2, high=2).propose("a", tokens, 10) == [2, 9]


def test_caps_min_n_and_nothing_to_match():
    tokens = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    assert proposer(k=4).propose("a", tokens, 2) == [4, 5]  # the caller's cap
    assert proposer(k=3).propose("b", tokens, 10) == [4, 5, 6]  # num_speculative_tokens
    assert proposer(low=4, high=5).propose("c", tokens, 10) == []  # a 3-token match is under prompt_lookup_min
    assert proposer().propose("d", [1, 2, 3, 4], 10) == []
    assert proposer().propose("e", [1], 10) == []


def test_a_draft_may_run_into_the_text_that_repeats():
    assert proposer(k=4).propose("a", [7, 7, 7, 7], 10) == [7]  # what followed the match ends at the text's end


def test_incremental_use_equals_a_fresh_look():
    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(400)]
    grown = proposer()
    for end in range(1, len(tokens), 7):
        assert grown.propose("a", tokens[:end], 4) == proposer().propose("a", tokens[:end], 4)
    grown.finish("a", [])
    assert grown.propose("a", [9, 8, 9], 4) == [8, 9]  # the same id after finish starts afresh


def test_longest_earlier_match_counts_each_earlier_occurrence():
    n, ends = longest_earlier_match(np.array([4, 1, 2, 4, 1, 2, 3, 1, 2]), 5)
    assert n == 2 and ends.tolist() == [2, 5]


def test_the_cost_does_not_grow_with_each_step():
    """A 4,000-token history: 200 proposals (each after one more token) stay far under a second."""
    rng = random.Random(1)
    tokens = [rng.randrange(50) for _ in range(4000)]
    ngram = proposer(k=5, low=2, high=5)
    start = time.perf_counter()
    for step in range(200):
        ngram.propose("a", tokens[: 3800 + step], 5)
    assert time.perf_counter() - start < 1.0
