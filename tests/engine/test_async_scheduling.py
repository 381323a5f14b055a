"""Overlapped scheduling (async_scheduling=True) against the synchronous engine: the same tokens, finish reasons
and logprobs in every case (chunked prefill, preemption, stops, aborts, n > 1, grammars, seeded sampling, a
failing step), each output once and in order, and no KV block left behind."""

import argparse
import random
from collections.abc import Callable

import pytest
from engine_utils import Run, assert_all_blocks_free, make_engine, run_all

from pagedserve import LLM
from pagedserve.engine.engine_core import EngineCore
from pagedserve.engine.protocol import AddRequest
from pagedserve.entrypoints.cli import add_engine_args
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 512) for _ in range(length)]


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def run_with(llama_dir: str, script: Callable[[EngineCore], None], async_scheduling: bool, **kwargs) -> Run:
    """`script` adds requests (and may step the engine itself, collecting into the Run it returns)."""
    engine = make_engine(llama_dir, async_scheduling=async_scheduling, **kwargs)
    run = Run()
    engine.run = run  # type: ignore[attr-defined]  # for scripts that step the engine themselves
    script(engine)
    run_all(engine, run)
    engine.last_stats = engine.stats()  # type: ignore[attr-defined]
    return run


def outputs(run: Run) -> dict:
    """(request id, index) -> (tokens, finish reason, stop reason); None, None for an aborted or stopped sample
    (the front end makes their final output)."""
    finals = {key: (final.finish_reason, final.stop_reason) for key, final in run.finals.items()}
    return {key: (tokens, *finals.get(key, (None, None))) for key, tokens in run.tokens.items()}


def assert_same(llama_dir: str, script: Callable[[EngineCore], None], **kwargs) -> Run:
    sync = run_with(llama_dir, script, False, **kwargs)
    overlapped = run_with(llama_dir, script, True, **kwargs)
    assert outputs(overlapped) == outputs(sync)
    return overlapped


def step_into(engine: EngineCore, steps: int) -> None:
    for _ in range(steps):
        for out in engine.step():
            engine.run.add(out)  # type: ignore[attr-defined]


def test_mixed_batch_with_shared_prefixes_overlaps_and_matches(llama_dir):
    """Mixed prompt lengths and max_tokens, EOS on for half, logprobs for some; a second wave arrives while steps
    run and takes prefix-cache hits on blocks the running steps write."""
    rng = random.Random(0)
    prefix = random_prompt(48, seed=99)
    overlapped_steps = []

    def script(engine: EngineCore) -> None:
        for i in range(24):
            prompt = random_prompt(rng.randrange(1, 120), seed=i)
            engine.add_request(AddRequest(f"a{i}", (prefix if i % 2 else []) + prompt, greedy(
                rng.randrange(1, 40), ignore_eos=i % 3 == 0, logprobs=2 if i % 5 == 0 else None)))
        step_into(engine, 3)
        overlapped_steps.append(len(engine.in_flight))
        for i in range(16):
            engine.add_request(AddRequest(f"b{i}", prefix + random_prompt(rng.randrange(1, 40), seed=100 + i),
                               greedy(rng.randrange(1, 30), ignore_eos=True)))

    sync = run_with(llama_dir, script, False, num_kv_blocks=1024)
    rng = random.Random(0)
    overlapped = run_with(llama_dir, script, True, num_kv_blocks=1024)
    assert overlapped_steps == [0, 1]  # the async engine keeps a step in flight
    assert outputs(overlapped) == outputs(sync)
    logprobs = {key: (run.firsts[key].new_logprobs, run.finals[key].new_logprobs)
                for run in (sync, overlapped) for key in run.finals if key[0] in ("a0", "a5")}
    assert all(first is not None for first, _ in logprobs.values())
    assert len(sync.tokens) == 40 and sum(map(len, sync.tokens.values())) > 500


def test_chunked_prefill(llama_dir):
    def script(engine: EngineCore) -> None:
        for i in range(12):
            engine.add_request(AddRequest(f"r{i}", random_prompt(10 + 9 * i, seed=i),
                                          greedy(5 + 3 * i, ignore_eos=True)))

    assert_same(llama_dir, script, max_num_batched_tokens=32, num_kv_blocks=256)


def test_preemption_in_a_tiny_pool(llama_dir):
    engines = []

    def script(engine: EngineCore) -> None:
        engines.append(engine)
        for i in range(8):
            engine.add_request(AddRequest(f"r{i}", random_prompt(20 + 3 * i, seed=i), greedy(40, ignore_eos=True)))

    assert_same(llama_dir, script, num_kv_blocks=14, max_num_batched_tokens=64)
    assert all(engine.last_stats.num_preemptions > 0 for engine in engines)


def test_stop_token_ids_eos_and_min_tokens(llama_dir):
    free = run_with(llama_dir, lambda e: [e.add_request(AddRequest(f"r{i}", random_prompt(5 + i, seed=i), greedy(30)))
                                          for i in range(10)], False)
    stops = {f"r{i}": free.tokens[(f"r{i}", 0)][min(4, len(free.tokens[(f"r{i}", 0)]) - 1)] for i in range(10)}

    def script(engine: EngineCore) -> None:
        for i in range(10):
            engine.add_request(AddRequest(f"r{i}", random_prompt(5 + i, seed=i),
                               greedy(30, stop_token_ids=[stops[f"r{i}"]], min_tokens=6 if i % 2 else 0)))
        engine.add_request(AddRequest("eos", [5, 6], greedy(30, stop_token_ids=[engine.eos_token_ids[0]])))

    run = assert_same(llama_dir, script)
    assert any(final.stop_reason is not None for final in run.finals.values())


def test_seeded_sampling_with_penalties(llama_dir):
    def script(engine: EngineCore) -> None:
        for i in range(10):
            engine.add_request(AddRequest(f"r{i}", random_prompt(3 + 4 * i, seed=i), SamplingParams(
                temperature=1.0, top_p=0.9, top_k=50, seed=i, max_tokens=25, repetition_penalty=1.2,
                presence_penalty=0.5, logprobs=1 if i % 2 else None)))

    assert_same(llama_dir, script)


def test_a_stopped_requests_id_and_seed_can_come_back(llama_dir):
    """A request that stops while its next step runs: the runner forgets it (and its generator) even though the
    step that drains the pipeline schedules nothing, so the same id and seed sample the same tokens again."""
    engine = make_engine(llama_dir, async_scheduling=True)
    prompt = random_prompt(7, seed=1)
    engine.add_request(AddRequest("s", prompt, SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True)))
    first = run_all(engine).tokens[("s", 0)]
    stop = first[3]
    for _ in range(2):
        engine.add_request(AddRequest("s", prompt, SamplingParams(temperature=1.0, seed=5, max_tokens=20,
                                                                  ignore_eos=True, stop_token_ids=[stop])))
        run = run_all(engine)
        assert run.tokens[("s", 0)] == first[: first.index(stop) + 1] and run.finals[("s", 0)].stop_reason == stop


def test_n_samples_among_plain_requests(llama_dir):
    def script(engine: EngineCore) -> None:
        engine.add_request(AddRequest("plain0", random_prompt(30, seed=1), greedy(20, ignore_eos=True)))
        engine.add_request(AddRequest("n", random_prompt(40, seed=2), SamplingParams(
            n=4, temperature=1.0, seed=7, max_tokens=15, ignore_eos=True)))
        engine.add_request(AddRequest("plain1", random_prompt(9, seed=3), greedy(25, ignore_eos=True)))
        step_into(engine, 4)
        engine.add_request(AddRequest("n-late", random_prompt(20, seed=4), SamplingParams(
            n=3, temperature=1.0, seed=8, max_tokens=10)))

    run = assert_same(llama_dir, script, num_kv_blocks=128)
    assert len([key for key in run.finals if key[0] == "n"]) == 4


def test_a_constrained_request_among_plain_ones(llama_dir):
    def script(engine: EngineCore) -> None:
        for i in range(6):
            engine.add_request(AddRequest(f"r{i}", random_prompt(4 + 5 * i, seed=i), greedy(20, ignore_eos=True)))
        engine.add_request(AddRequest("choice", [5, 6, 7], SamplingParams(
            temperature=1.0, seed=3, max_tokens=50,
            structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe not"]))))
        engine.add_request(AddRequest("regex", [8, 9], SamplingParams(
            temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,5}"))))

    run = assert_same(llama_dir, script, structured_outputs_config={"backend": "xgrammar"})
    assert run.finals[("choice", 0)].finish_reason == run.finals[("regex", 0)].finish_reason == "stop"


def test_aborts_and_stopped_samples_mid_run(llama_dir):
    """Whatever step an abort lands in, an aborted request's tokens are a prefix of its full output, it finishes
    once, and the others are unchanged; a reused id starts afresh."""
    prompts = {f"r{i}": random_prompt(6 + 7 * i, seed=i) for i in range(8)}

    def add_all(engine: EngineCore) -> None:
        for request_id, prompt in prompts.items():
            engine.add_request(AddRequest(request_id, prompt, greedy(30, ignore_eos=True)))

    full = outputs(run_with(llama_dir, add_all, False))

    def script(engine: EngineCore) -> None:
        add_all(engine)
        step_into(engine, 5)
        engine.abort_requests(["r1", "r4"])
        engine.stop_samples([("r6", 0)])
        step_into(engine, 1)
        engine.abort_requests(["r7"])

    for async_scheduling in (False, True):
        run = run_with(llama_dir, script, async_scheduling)
        for key, (tokens, reason, _) in outputs(run).items():
            if key[0] in ("r1", "r4", "r6", "r7"):
                assert tokens == full[key][0][: len(tokens)] and len(tokens) < 30 and reason is None
            else:
                assert (tokens, reason) == full[key][:2]

    engine = make_engine(llama_dir, async_scheduling=True)
    engine.add_request(AddRequest("a", prompts["r2"], greedy(30, ignore_eos=True)))
    engine.step()
    engine.step()
    engine.abort_requests(["a"])  # while its next step runs; the same id comes back at once
    engine.add_request(AddRequest("a", prompts["r3"], greedy(30, ignore_eos=True)))
    run = run_all(engine)
    assert run.tokens[("a", 0)] == full[("r3", 0)][0]


POISON = 13  # a token id whose presence in a step breaks the (patched) model


def test_a_failing_step_fails_only_its_request(llama_dir, monkeypatch):
    """The step behind the failing one does not run; its requests are recomputed and still get their tokens."""
    prompts = {f"r{i}": random_prompt(4 + 3 * i, seed=i) for i in range(6)}

    def script(engine: EngineCore) -> None:
        for request_id, prompt in prompts.items():
            engine.add_request(AddRequest(request_id, prompt, greedy(12, ignore_eos=True)))
        step_into(engine, 3)
        engine.add_request(AddRequest("bad", [5, POISON, 7], greedy(12, ignore_eos=True)))

    expected = {key: value for key, value in outputs(run_with(llama_dir, script, False)).items() if key[0] != "bad"}
    engines = []
    for async_scheduling in (False, True):
        engine = make_engine(llama_dir, async_scheduling=async_scheduling)
        real_forward = engine.model_runner.model.forward

        def forward(input_ids, positions, meta, real_forward=real_forward):
            if (input_ids == POISON).any():
                raise RuntimeError("poisoned batch")
            return real_forward(input_ids, positions, meta)

        monkeypatch.setattr(engine.model_runner.model, "forward", forward)
        engine.run = run = Run()  # type: ignore[attr-defined]
        script(engine)
        run_all(engine, run)
        assert run.finals[("bad", 0)].finish_reason == "error" and "poisoned" in run.finals[("bad", 0)].error
        assert {key: value for key, value in outputs(run).items() if key[0] != "bad"} == expected
        engines.append(engine)
    assert engines[1].scheduler.num_preemptions > 0  # the step behind the failed one was undone


def test_llm_and_cli_take_the_option(llama_dir):
    args = argparse.ArgumentParser()
    add_engine_args(args)
    assert args.parse_args(["--async-scheduling"]).async_scheduling and not args.parse_args([]).async_scheduling
    prompts = ["The quick brown fox", "Paged attention", "def add(a, b):"] * 4
    params = [SamplingParams(temperature=0, max_tokens=8 + i) for i in range(len(prompts))]
    texts = []
    for async_scheduling in (False, True):
        llm = LLM(llama_dir, dtype="float32", max_model_len=128, num_kv_blocks=64, async_scheduling=async_scheduling)
        texts.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        assert_all_blocks_free(llm.engine)
    assert texts[0] == texts[1]


@pytest.mark.parametrize("max_tokens", [1, 2])
def test_tiny_max_tokens(llama_dir, max_tokens):
    """Requests that finish at their first or second token: nothing is scheduled past max_tokens."""
    def script(engine: EngineCore) -> None:
        for i in range(5):
            engine.add_request(AddRequest(f"r{i}", random_prompt(3 + i, seed=i), greedy(max_tokens, ignore_eos=True)))

    run = assert_same(llama_dir, script)
    assert all(len(tokens) == max_tokens for tokens in run.tokens.values())
