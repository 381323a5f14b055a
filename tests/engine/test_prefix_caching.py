"""Prefix caching through the engine core: same greedy tokens as without it, exact hit counts, salts,
LRU eviction under a small pool, hits after preemption, reset_prefix_cache, and no leaked block."""

import random

import pytest
from conftest import ARCHITECTURES
from engine_utils import Run, make_engine, run_all

from pagedserve.engine.engine_core import EngineCore
from pagedserve.engine.protocol import AddRequest
from pagedserve.sampling_params import SamplingParams

BS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SHARED_PREFIXES = (0, 1, 15, 16, 17, 70)  # tokens shared with the base prompt: none, under, at, over a block, many


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(5, 512) for _ in range(n)]


def make_waves(seed: int = 0) -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, int]]:
    """Two waves of prompts sharing prefixes of a base prompt, and the hits each second-wave prompt must get."""
    rng = random.Random(seed)
    base = random_tokens(rng, 90)
    first, second, expected_hits = {}, {}, {}
    for shared in SHARED_PREFIXES:
        first[f"p{shared}-a"] = base[:shared] + random_tokens(rng, 7 + shared % 5)
        second[f"p{shared}-b"] = base[:shared] + random_tokens(rng, 9)
        expected_hits[f"p{shared}-b"] = shared // BS * BS
    first["exact33"] = base[:33]
    second["exact33-again"], expected_hits["exact33-again"] = base[:33], 32
    second["exact32"], expected_hits["exact32"] = base[:32], 16  # a hit on block 2 would leave nothing to compute
    return first, second, expected_hits


def generate(engine: EngineCore, waves: list[dict[str, list[int]]], steps_between: int = 3) -> Run:
    """Add each wave `steps_between` steps after the previous one, then run dry."""
    run = Run()
    for wave in waves:
        for request_id, prompt in wave.items():
            engine.add_request(AddRequest(request_id, prompt, GREEDY))
        for _ in range(steps_between):
            for out in engine.step():
                run.add(out)
    return run_all(engine, run)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_greedy_outputs_match_with_and_without_caching(checkpoints, arch):
    first, second, expected_hits = make_waves()
    reference = generate(make_engine(checkpoints[arch], enable_prefix_caching=False), [first, second])
    assert len(reference.tokens) == len(first) + len(second)
    assert all(len(tokens) == GREEDY.max_tokens for tokens in reference.tokens.values())

    cached_engine = make_engine(checkpoints[arch], enable_prefix_caching=True)
    cached = generate(cached_engine, [first, second])
    assert cached.tokens == reference.tokens
    for request_id, hits in expected_hits.items():
        assert cached.firsts[(request_id, 0)].num_cached_tokens == hits, request_id

    # Chunked prefill (24-token budget) and a pool too small for everyone at once (preemption).
    tight_engine = make_engine(checkpoints[arch], enable_prefix_caching=True, max_num_batched_tokens=24,
                               num_kv_blocks=12)
    tight = generate(tight_engine, [first, second], steps_between=2)
    assert tight.tokens == reference.tokens
    stats = tight_engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


def run_until_finished(engine: EngineCore, run: Run, key: tuple[str, int]) -> None:
    for _ in range(500):
        if key in run.finals:
            return
        for out in engine.step():
            run.add(out)
    raise AssertionError(f"{key} did not finish")


def test_a_preempted_request_resumes_from_its_own_cached_blocks(llama_dir):
    rng = random.Random(1)
    prompts = {f"r{i}": random_tokens(rng, 40) for i in range(4)}  # nothing shared between them
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    def generate_all(engine: EngineCore) -> Run:
        for request_id, prompt in prompts.items():
            engine.add_request(AddRequest(request_id, prompt, params))
        return run_all(engine)

    reference = generate_all(make_engine(llama_dir, enable_prefix_caching=False, num_kv_blocks=12))
    engine = make_engine(llama_dir, enable_prefix_caching=True, num_kv_blocks=12)
    run = Run()
    for request_id, prompt in prompts.items():
        engine.add_request(AddRequest(request_id, prompt, params))
    resumed_hits = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            run.add(out)
            if out.num_cached_tokens:
                resumed_hits.setdefault(out.request_id, out.num_cached_tokens)
    assert run.tokens == reference.tokens
    assert engine.stats().num_preemptions > 0
    assert resumed_hits and all(hits % BS == 0 and hits >= BS for hits in resumed_hits.values())
    assert engine.stats().prefix_cache_hits >= sum(resumed_hits.values())
    run_all(engine)  # checks that no block leaked


def test_lru_eviction_under_a_small_pool_keeps_in_use_blocks_and_outputs(llama_dir):
    """A long request holds its blocks while short ones churn through the rest of a 12-block pool."""
    rng = random.Random(2)
    long_prompt = random_tokens(rng, 40)
    short_prompts = [random_tokens(rng, 33) for _ in range(6)]
    long_params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)  # grows to 7 blocks

    def drive(engine: EngineCore) -> Run:
        run = Run()
        engine.add_request(AddRequest("long", long_prompt, long_params))
        for i, prompt in enumerate(short_prompts):
            engine.add_request(AddRequest(f"short{i}", prompt, GREEDY))
            run_until_finished(engine, run, (f"short{i}", 0))
        return run_all(engine, run)

    reference = drive(make_engine(llama_dir, enable_prefix_caching=False, num_kv_blocks=12))
    engine = make_engine(llama_dir, enable_prefix_caching=True, num_kv_blocks=12)
    assert drive(engine).tokens == reference.tokens
    assert engine.stats().num_preemptions == 0  # eviction only: no request lost a block it was using

    def hits(prompt: list[int]) -> int:
        engine.add_request(AddRequest("probe", prompt, GREEDY))
        return run_all(engine).firsts[("probe", 0)].num_cached_tokens

    assert hits(short_prompts[-1]) == 32  # the most recently freed survive
    assert hits(short_prompts[0]) == 0  # the least recently freed were evicted
    assert hits(long_prompt) == 32


def test_different_cache_salts_never_share_blocks(llama_dir):
    engine = make_engine(llama_dir, enable_prefix_caching=True)
    prompt = random_tokens(random.Random(3), 40)
    runs = {}
    for request_id, salt in [("alice", "alice"), ("bob", "bob"), ("nobody", None), ("alice-again", "alice"),
                             ("nobody-again", None)]:
        engine.add_request(AddRequest(request_id, prompt, GREEDY, cache_salt=salt))
        runs[request_id] = run_all(engine)
    hits = {request_id: run.firsts[(request_id, 0)].num_cached_tokens for request_id, run in runs.items()}
    assert hits == {"alice": 0, "bob": 0, "nobody": 0, "alice-again": 32, "nobody-again": 32}
    assert len({tuple(run.tokens[(request_id, 0)]) for request_id, run in runs.items()}) == 1


def test_reset_prefix_cache_is_refused_while_blocks_are_in_use(llama_dir):
    engine = make_engine(llama_dir, enable_prefix_caching=True)
    prompt = random_tokens(random.Random(4), 40)
    engine.add_request(AddRequest("a", prompt, GREEDY))
    run_all(engine)
    engine.add_request(AddRequest("b", prompt, GREEDY))
    engine.step()
    assert engine.reset_prefix_cache() is False  # b holds cached blocks
    assert run_all(engine).finals[("b", 0)].num_cached_tokens == 32  # the refused reset changed nothing
    assert engine.reset_prefix_cache() is True
    engine.add_request(AddRequest("c", prompt, GREEDY))
    assert run_all(engine).finals[("c", 0)].num_cached_tokens == 0


def test_blocks_of_a_failed_step_are_not_served_as_hits(llama_dir, monkeypatch):
    engine = make_engine(llama_dir, enable_prefix_caching=True)
    prompt = random_tokens(random.Random(5), 40)
    real_execute = engine.model_runner.execute

    def broken(scheduled):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine.model_runner, "execute", broken)
    engine.add_request(AddRequest("a", prompt, GREEDY))
    assert run_all(engine).finals[("a", 0)].finish_reason == "error"
    monkeypatch.setattr(engine.model_runner, "execute", real_execute)
    engine.add_request(AddRequest("b", prompt, GREEDY))
    assert run_all(engine).finals[("b", 0)].num_cached_tokens == 0


def test_longrope_long_and_short_prompts_never_share_blocks(checkpoints):
    """Phi-3 LongRoPE rotates a prompt longer than the original context (80 here) with other factors: a
    long prompt must not reuse the K/V a short prompt with the same first tokens left in the cache."""
    prefix = random_tokens(random.Random(5), 64)
    long_prompt = prefix + random_tokens(random.Random(6), 40)
    cached = make_engine(checkpoints["phi3"], enable_prefix_caching=True)
    cached.add_request(AddRequest("short", prefix, GREEDY))
    assert run_all(cached).firsts[("short", 0)].num_cached_tokens == 0
    cached.add_request(AddRequest("long", long_prompt, GREEDY))
    with_cache = run_all(cached)
    assert with_cache.firsts[("long", 0)].num_cached_tokens == 0
    cached.add_request(AddRequest("long-again", long_prompt, GREEDY))  # same variant: shares
    assert run_all(cached).firsts[("long-again", 0)].num_cached_tokens == 96
    uncached = make_engine(checkpoints["phi3"], enable_prefix_caching=False)
    uncached.add_request(AddRequest("long", long_prompt, GREEDY))
    assert with_cache.tokens[("long", 0)] == run_all(uncached).tokens[("long", 0)]
