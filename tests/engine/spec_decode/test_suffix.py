"""SuffixProposer (vLLM's `suffix` method): drafts from the request's own tokens and from past outputs."""

import random
import time

from pagedserve.engine.spec_decode.suffix import SuffixProposer
from pagedserve.speculative_config import SpeculativeConfig


def make_proposer(**options: object) -> SuffixProposer:
    config = SpeculativeConfig.from_dict({"method": "suffix", **options})
    assert config is not None
    return SuffixProposer(config)


def test_config_defaults_are_vllms():
    config = SpeculativeConfig.from_dict({"method": "suffix"})
    assert config is not None
    assert config.num_speculative_tokens == 24
    assert config.suffix_decoding_max_tree_depth == 24
    assert config.suffix_decoding_max_cached_requests == 10000
    assert config.suffix_decoding_max_spec_factor == 1.0
    assert config.suffix_decoding_min_token_prob == 0.1


def test_a_repeated_pattern_in_the_prompt_is_drafted():
    prompt = list(range(1, 21)) + [1, 2, 3]
    assert make_proposer().propose("r", prompt, 100) == [4, 5, 6]  # spec factor 1: as many as matched
    assert make_proposer(suffix_decoding_max_spec_factor=2.0).propose("r", prompt, 100) == [4, 5, 6, 7, 8, 9]


def test_drafts_are_capped_by_max_tokens_speculative_tokens_and_spec_factor():
    prompt = list(range(1, 21)) + [1, 2, 3]
    wide = {"suffix_decoding_max_spec_factor": 4.0}
    assert make_proposer(**wide).propose("r", prompt, 2) == [4, 5]
    assert make_proposer(**wide, num_speculative_tokens=5).propose("r", prompt, 100) == [4, 5, 6, 7, 8]
    assert make_proposer(suffix_decoding_max_spec_factor=0.5).propose("r", prompt, 100) == [4]  # floor(1.5)
    assert make_proposer(suffix_decoding_max_spec_factor=0.3).propose("r", prompt, 100) == []  # floor(0.9)


def test_match_plus_draft_stays_within_the_tree_depth():
    # the longest match (10 tokens) could draft 2 tokens only (depth 12); matching 6 of them allows 6
    prompt = list(range(1, 21)) + list(range(1, 11))
    assert make_proposer(suffix_decoding_max_tree_depth=12).propose("r", prompt, 100) == [11, 12, 13, 14, 15, 16]
    # with the default depth of 24, a long repetition drafts 12 tokens: 12 matched + 12 drafted
    prompt = list(range(100)) + list(range(50))
    assert make_proposer().propose("r", prompt, 100) == list(range(50, 62))


def test_the_draft_stops_where_its_probability_falls_below_min_token_prob():
    # "10 11 12 13" went on with 5 7, 5 8, 6 9, 5 7 (then a different token each time): 5 has probability 3/4,
    # then 7 has 2/3 of the three, so 1/2 in all; then 1:1 between the two occurrences left (the latest wins), 1/4
    pattern = [10, 11, 12, 13]
    prompt = pattern + [5, 7, 90] + pattern + [5, 8, 91] + pattern + [6, 9, 92] + pattern + [5, 7, 93] + pattern
    assert make_proposer().propose("r", prompt, 100) == [5, 7, 93, 10]
    assert make_proposer(suffix_decoding_min_token_prob=0.3).propose("r", prompt, 100) == [5, 7]
    assert make_proposer(suffix_decoding_min_token_prob=0.55).propose("r", prompt, 100) == [5]  # not 2/3 alone
    assert make_proposer(suffix_decoding_min_token_prob=0.8).propose("r", prompt, 100) == []


def test_two_continuations_as_frequent_each_go_to_the_most_recent():
    prompt = [1, 2, 3, 40, 41, 9, 1, 2, 3, 50, 51, 8, 1, 2, 3]
    assert make_proposer().propose("r", prompt, 100) == [50, 51, 8]  # 1/2 each
    assert make_proposer(suffix_decoding_min_token_prob=0.6).propose("r", prompt, 100) == []


def test_nothing_to_match_drafts_nothing():
    proposer = make_proposer()
    assert proposer.propose("r", list(range(100)), 10) == []  # the suffix itself does not count
    assert proposer.propose("s", [7], 10) == []
    assert proposer.propose("t", [3, 4, 5, 3, 4, 5], 0) == []


def test_a_finished_requests_output_is_drafted_for_a_new_request():
    proposer = make_proposer()
    proposer.finish("old", list(range(50, 71)))
    assert proposer.propose("new", [1, 2, 3, 50, 51, 52, 53], 100) == [54, 55, 56, 57]


def test_the_cache_draft_must_score_higher_than_the_requests_own():
    proposer = make_proposer()
    proposer.finish("old", [7, 8, 9, 40, 41, 42, 43])
    # the request's own continuations split 1:1 (score 1.5); the cache's is sure (score 3)
    assert proposer.propose("a", [7, 8, 9, 20, 21, 22, 5, 7, 8, 9, 30, 31, 32, 6, 7, 8, 9], 100) == [40, 41, 42]
    # both sure (score 3 each): the request's own
    assert proposer.propose("b", [7, 8, 9, 20, 21, 22, 5, 7, 8, 9], 100) == [20, 21, 22]


def test_cached_outputs_do_not_run_into_each_other():
    proposer = make_proposer()
    proposer.finish("a", [1, 2, 3, 4, 5])
    proposer.finish("b", [6, 7, 8, 9])
    assert proposer.propose("new", [30, 3, 4, 5], 100) == []
    assert proposer.propose("new2", [30, 2, 3, 4], 100) == [5]


def test_max_cached_requests_evicts_the_oldest_output():
    proposer = make_proposer(suffix_decoding_max_cached_requests=1)
    proposer.finish("a", list(range(100, 120)))
    proposer.finish("b", list(range(200, 220)))
    assert proposer.propose("x", [100, 101, 102], 100) == []
    assert proposer.propose("y", [200, 201, 202], 100) == [203, 204, 205]


def test_eviction_over_many_outputs_keeps_the_most_recent():
    proposer = make_proposer(suffix_decoding_max_cached_requests=3)
    for i in range(60):  # outputs of several lengths: the cache's ring buffer wraps around many times
        marker = 10000 + 10 * i
        proposer.finish(f"r{i}", [marker, marker + 1, marker + 2, 5, 6] + [7] * (i % 5))
    for i in range(60):
        marker = 10000 + 10 * i
        assert proposer.propose(f"q{i}", [marker, marker + 1], 100) == ([marker + 2, 5] if i >= 57 else [])


def test_zero_max_cached_requests_disables_the_cache():
    proposer = make_proposer(suffix_decoding_max_cached_requests=0)
    proposer.finish("a", list(range(100, 120)))
    assert proposer.propose("x", [100, 101, 102], 100) == []


def test_finish_drops_the_requests_own_tokens():
    proposer = make_proposer(suffix_decoding_max_cached_requests=0)
    assert proposer.propose("r", list(range(1, 11)) + [1, 2, 3], 100) == [4, 5, 6]
    proposer.finish("r", [])
    assert proposer.propose("r", [1, 2, 3], 100) == []


def random_text(rng: random.Random, length: int) -> list[int]:
    """Tokens with recurring phrases, so that matches of all lengths occur."""
    phrases = [[rng.randrange(40) for _ in range(rng.randrange(2, 12))] for _ in range(15)]
    text: list[int] = []
    while len(text) < length:
        text += rng.choice(phrases) if rng.random() < 0.7 else [rng.randrange(40)]
    return text[:length]


def test_growing_token_ids_draft_as_a_fresh_proposer_given_the_whole_list():
    rng = random.Random(0)
    outputs = [random_text(rng, 60) for _ in range(5)]
    tokens = random_text(rng, 600)

    def with_cache() -> SuffixProposer:
        proposer = make_proposer(num_speculative_tokens=6)
        for i, output in enumerate(outputs):
            proposer.finish(f"old{i}", output)
        return proposer

    incremental = with_cache()
    length, drafted = 200, 0
    while length <= len(tokens):
        draft = incremental.propose("r", tokens[:length], 5)
        assert draft == with_cache().propose("r", tokens[:length], 5)
        drafted += len(draft)
        length += rng.randint(1, 6)
    assert drafted > 0


def test_deterministic():
    rng = random.Random(1)
    tokens = random_text(rng, 500)
    drafts = [make_proposer().propose("r", tokens[:n], 10) for n in range(100, 500, 7)]
    assert drafts == [make_proposer().propose("r", tokens[:n], 10) for n in range(100, 500, 7)]


def test_the_cost_of_a_proposal_stays_bounded():
    rng = random.Random(2)
    proposer = make_proposer()
    for i in range(500):  # 200k cached tokens, whose few token ids each occur thousands of times
        proposer.finish(f"old{i}", random_text(rng, 400))
    tokens = random_text(rng, 4200)
    proposer.propose("r", tokens[:4000], 24)
    start = time.perf_counter()
    for length in range(4001, 4201):
        proposer.propose("r", tokens[:length], 24)
    assert time.perf_counter() - start < 1.0  # 0.1 to 0.3 ms each on a small shared CPU
