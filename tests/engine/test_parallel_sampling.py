"""n > 1 in the engine core: one prefill, samples sharing the prompt's blocks (copy-on-write), each sample
sampling as an n=1 request seeded seed + index would, and finishing, aborting and preempting on its own."""

import random
from collections.abc import Callable

import pytest
from engine_utils import Run, assert_all_blocks_free, make_engine, run_all

from pagedserve.engine.engine_core import EngineCore
from pagedserve.engine.protocol import AddRequest
from pagedserve.sampling_params import SamplingParams

SEED = 11


def random_prompt(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 512) for _ in range(length)]


def sampled(n: int = 1, seed: int | None = SEED, max_tokens: int = 8, **kwargs) -> SamplingParams:
    return SamplingParams(n=n, seed=seed, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


@pytest.fixture(scope="module")
def reference_engine(llama_dir) -> EngineCore:
    return make_engine(llama_dir, enable_prefix_caching=False)


def single_references(engine: EngineCore, prompt: list[int], n: int, **kwargs) -> tuple[list[list[int]], Run]:
    """What n separate n=1 requests seeded SEED + i sample, run together."""
    for i in range(n):
        engine.add_request(AddRequest(f"single{i}", prompt, sampled(seed=SEED + i, **kwargs)))
    run = run_all(engine)
    return [run.tokens[(f"single{i}", 0)] for i in range(n)], run


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("prompt_len", [1, 16, 40])
def test_n_samples_share_the_prompt_and_equal_seeded_single_requests(llama_dir, reference_engine, caching,
                                                                     prompt_len):
    prompt = random_prompt(prompt_len)
    expected, singles = single_references(reference_engine, prompt, 4)
    engine = make_engine(llama_dir, enable_prefix_caching=caching)
    engine.add_request(AddRequest("a", prompt, sampled(n=4)))
    run = run_all(engine)
    assert [run.tokens[("a", i)] for i in range(4)] == expected
    assert set(run.tokens) == {("a", i) for i in range(4)}
    assert all(run.finals[("a", i)].finish_reason == "length" for i in range(4))
    assert len({tuple(tokens) for tokens in expected}) == 4  # the seeds really differ
    if prompt_len == 40:
        # 40 + 8 tokens write positions 0..46: 3 blocks of 16 a sequence. Four requests hold 12; the four
        # samples share the prompt's 2 full blocks and hold one last block each.
        assert singles.peak_blocks_used == 12 and run.peak_blocks_used == 6
    assert run.peak_blocks_used <= singles.peak_blocks_used
    assert engine.stats().prefix_cache_queries == (prompt_len if caching else 0)  # one lookup, not four


def test_n_samples_with_chunked_prefill_and_unseeded_sampling(llama_dir):
    engine = make_engine(llama_dir, max_num_batched_tokens=16)
    engine.add_request(AddRequest("a", random_prompt(50), sampled(n=3, seed=None, max_tokens=6)))
    engine.add_request(AddRequest("b", random_prompt(20, seed=1), sampled(n=2, seed=None, max_tokens=6)))
    run = run_all(engine)
    assert sorted(run.tokens) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    assert all(len(tokens) == 6 and all(0 <= t < 512 for t in tokens) for tokens in run.tokens.values())


def test_samples_stop_on_their_own(llama_dir, reference_engine):
    prompt = random_prompt(40)
    expected, _ = single_references(reference_engine, prompt, 4, max_tokens=12)
    # A stop token that one sample draws early and another never draws.
    stop = next(t for t in expected[1][1:6] if t not in expected[0])
    engine = make_engine(llama_dir)
    engine.add_request(AddRequest("a", prompt, sampled(n=4, max_tokens=12, stop_token_ids=[stop])))
    run = run_all(engine)
    for i, tokens in enumerate(expected):
        cut = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        assert run.tokens[("a", i)] == tokens[:cut]
        final = run.finals[("a", i)]
        assert (final.finish_reason, final.stop_reason) == (("stop", stop) if stop in tokens else ("length", None))
    assert run.finals[("a", 1)].finish_reason == "stop" and run.finals[("a", 0)].finish_reason == "length"


@pytest.mark.parametrize("caching", [True, False])
def test_preempted_samples_resume_and_still_equal_seeded_single_requests(llama_dir, reference_engine, caching):
    prompt = random_prompt(40)
    expected, _ = single_references(reference_engine, prompt, 4, max_tokens=30)
    # 4 samples of 70 tokens need 2 shared + 4 x 3 blocks: 10 do not hold them
    engine = make_engine(llama_dir, enable_prefix_caching=caching, num_kv_blocks=10)
    engine.add_request(AddRequest("a", prompt, sampled(n=4, max_tokens=30)))
    run = run_all(engine)
    assert engine.stats().num_preemptions > 0
    assert [run.tokens[("a", i)] for i in range(4)] == expected


def step_until(engine: EngineCore, run: Run, done: Callable[[Run], bool]) -> None:
    for _ in range(200):
        if done(run):
            return
        for out in engine.step():
            run.add(out)
    raise AssertionError("condition never reached")


def test_abort_requests_aborts_every_sample_at_any_stage(llama_dir):
    engine = make_engine(llama_dir, max_num_batched_tokens=16)
    prompt = random_prompt(40)
    for stage in ("waiting", "mid-prefill", "forked", "decoding"):
        run = Run()
        engine.add_request(AddRequest("a", prompt, sampled(n=3, max_tokens=20)))
        if stage == "mid-prefill":
            step_until(engine, run, lambda _: bool(engine.kv_cache_manager.req_blocks.get("a#0")))
        elif stage == "forked":
            step_until(engine, run, lambda run: ("a", 0) in run.tokens)
        elif stage == "decoding":
            step_until(engine, run, lambda run: all(len(run.tokens.get(("a", i), ())) >= 2 for i in range(3)))
        engine.abort_requests(["a"])
        assert not engine.has_unfinished_requests() and engine.step() == []
        assert_all_blocks_free(engine)


def test_abort_one_sample_and_the_others_go_on(llama_dir, reference_engine):
    prompt = random_prompt(40)
    expected, _ = single_references(reference_engine, prompt, 4, max_tokens=12)
    engine = make_engine(llama_dir)
    engine.add_request(AddRequest("a", prompt, sampled(n=4, max_tokens=12)))
    run = Run()
    step_until(engine, run, lambda run: all(len(run.tokens.get(("a", i), ())) >= 3 for i in range(4)))
    engine.stop_samples([("a", 2), ("a", 7), ("nope", 0)])
    run = run_all(engine, run)
    assert ("a", 2) not in run.finals
    assert run.tokens[("a", 2)] == expected[2][: len(run.tokens[("a", 2)])]
    assert [run.tokens[("a", i)] for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]


def test_aborting_the_first_sample_before_the_fork_hands_the_prompt_to_the_next(llama_dir, reference_engine):
    prompt = random_prompt(40)
    expected, _ = single_references(reference_engine, prompt, 3)
    engine = make_engine(llama_dir, max_num_batched_tokens=16)
    engine.add_request(AddRequest("a", prompt, sampled(n=3)))
    engine.step()  # the first sample is mid-prefill
    engine.stop_samples([("a", 0)])
    run = run_all(engine)
    assert set(run.tokens) == {("a", 1), ("a", 2)}
    assert [run.tokens[("a", i)] for i in (1, 2)] == expected[1:]


def test_samples_take_seats_under_max_num_seqs(llama_dir):
    engine = make_engine(llama_dir, max_num_seqs=4)
    engine.add_request(AddRequest("a", random_prompt(20), sampled(n=3)))
    engine.add_request(AddRequest("b", random_prompt(20, seed=1), sampled(n=2)))
    run = Run()
    while engine.has_unfinished_requests():
        for out in engine.step():
            run.add(out)
        running = engine.scheduler.running
        assert len(running) + sum(len(r.pending_forks) for r in running) <= 4
    assert len(run.finals) == 5
    assert_all_blocks_free(engine)


def test_bad_n_requests_are_value_errors(llama_dir):
    engine = make_engine(llama_dir, max_num_seqs=4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_request(AddRequest("a", [5, 6], sampled(n=5)))
    with pytest.raises(ValueError, match="seed"):
        engine.add_request(AddRequest("b", [5, 6], sampled(n=2, seed=2**64 - 1)))
    assert not engine.has_unfinished_requests()
    assert_all_blocks_free(engine)


def test_every_sample_reports_an_error_the_prompt_had(llama_dir, monkeypatch):
    engine = make_engine(llama_dir, num_kv_blocks=2)

    def broken(sched, req_ids):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine.model_runner, "execute", broken)
    engine.add_request(AddRequest("a", random_prompt(10), sampled(n=3)))
    run = run_all(engine)
    assert sorted(run.finals) == [("a", 0), ("a", 1), ("a", 2)]
    assert all("kernel exploded" in out.error for out in run.finals.values())
