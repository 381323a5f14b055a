"""Speculative decoding in the engine: with drafts on, every request's tokens, finish reasons and logprobs are
those of the engine without them (greedy and seeded sampling, penalties, stops, min_tokens, max_tokens, n > 1,
preemption, overlapped scheduling, grammars), drafts that the model agrees with are accepted, rejected ones give
their KV slots back, and no block is left behind.

Random tiny models rarely repeat themselves, so besides the real proposers these tests use an oracle: it drafts a
request's true continuation (taken from a run without drafts), wrong at chosen positions."""

import random

import pytest
from engine_utils import Run, make_engine, run_all

from pagedserve.engine.engine_core import EngineCore
from pagedserve.engine.protocol import AddRequest
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 512) for _ in range(length)]


class Oracle:
    """Drafts the reference continuation of each request (by request id, after its prompt), with `wrong_at`
    positions of each draft replaced by a token that is not the reference's."""

    def __init__(self, reference: dict[str, tuple[int, list[int]]], wrong_at: tuple[int, ...] = ()) -> None:
        self.reference = reference  # request id -> (prompt length, output tokens)
        self.wrong_at = wrong_at

    def propose(self, request_id: str, token_ids: list[int], max_tokens: int) -> list[int]:
        prompt_len, output = self.reference[request_id]
        done = len(token_ids) - prompt_len
        draft = list(output[done : done + max_tokens])
        for position in self.wrong_at:
            if position < len(draft):
                draft[position] = (draft[position] + 1) % 512
        return draft

    def finish(self, request_id: str, output_token_ids: list[int]) -> None:
        pass


def reference_of(plain: Run, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, tuple[int, list[int]]]:
    return {f"{rid}#{index}": (len(requests[int(rid[1:])][0]), tokens) for (rid, index), tokens in plain.tokens.items()}


def run(checkpoint: str, requests: list[tuple[list[int], SamplingParams]], spec: dict | None = None,
        oracle: Oracle | None = None, **engine_kwargs) -> tuple[Run, EngineCore]:
    engine = make_engine(checkpoint, speculative_config=spec, **engine_kwargs)
    if oracle is not None:
        assert engine.drafter is not None
        engine.drafter.proposer = oracle  # type: ignore[assignment]
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(AddRequest(f"r{i}", prompt, params))
    return run_all(engine), engine


def results(run: Run) -> dict:
    return {key: (tokens, run.finals[key].finish_reason, run.finals[key].stop_reason)
            for key, tokens in run.tokens.items()}


def assert_same_with_oracle(checkpoint: str, requests: list[tuple[list[int], SamplingParams]],
                            wrong_at: tuple[int, ...] = (), **engine_kwargs) -> tuple[Run, EngineCore]:
    plain, _ = run(checkpoint, requests, **engine_kwargs)
    drafted, engine = run(checkpoint, requests, {**NGRAM, "num_speculative_tokens": 5},
                          Oracle(reference_of(plain, requests), wrong_at),
                          **engine_kwargs)
    assert results(drafted) == results(plain)
    return drafted, engine


def test_greedy_tokens_are_the_same_with_ngram_drafts_in_every_family(checkpoints):
    requests = [(random_prompt(12, seed=i) * 2, SamplingParams(temperature=0, max_tokens=24)) for i in range(3)]
    for arch, checkpoint in checkpoints.items():
        plain, _ = run(checkpoint, requests)
        drafted, engine = run(checkpoint, requests, NGRAM)
        assert results(drafted) == results(plain), arch
        assert engine.drafter is not None and engine.drafter.stats.num_drafts > 0, arch


def test_a_right_draft_is_accepted_whole_and_saves_steps(llama_dir):
    requests = [(random_prompt(9, seed=i), SamplingParams(temperature=0, max_tokens=31, ignore_eos=True))
                for i in range(3)]
    drafted, engine = assert_same_with_oracle(llama_dir, requests)
    stats = engine.drafter.stats  # type: ignore[union-attr]
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert stats.accepted_per_position[4] == stats.num_drafts  # every draft was 5 tokens, all right
    # 30 tokens after the first: 5 per step from drafts plus the one sampled after them
    assert stats.num_drafts == 3 * 5


def test_a_draft_is_accepted_up_to_its_first_wrong_token(llama_dir):
    requests = [(random_prompt(9, seed=i), SamplingParams(temperature=0, max_tokens=30)) for i in range(4)]
    _, engine = assert_same_with_oracle(llama_dir, requests, wrong_at=(2,))
    stats = engine.drafter.stats  # type: ignore[union-attr]
    assert stats.accepted_per_position[0] == stats.num_drafts and stats.accepted_per_position[1] > 0
    assert stats.accepted_per_position[2:] == [0] * 3
    assert engine.stats().num_kv_blocks_free == engine.stats().num_kv_blocks_total


def test_seeded_sampling_with_penalties_and_logprobs_is_the_same_with_drafts(llama_dir):
    requests = [(random_prompt(5 + 3 * i, seed=i), SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=i, max_tokens=25, repetition_penalty=1.2, presence_penalty=0.5,
        frequency_penalty=0.3, logprobs=2 if i % 2 else None)) for i in range(6)]
    plain, _ = run(llama_dir, requests)
    for wrong_at in ((), (1,), (0,)):
        drafted, engine = run(llama_dir, requests, NGRAM, Oracle(reference_of(plain, requests), wrong_at))
        assert results(drafted) == results(plain)
        assert (engine.drafter.stats.num_accepted_tokens > 0) == (wrong_at != (0,))  # type: ignore[union-attr]


def test_logprobs_of_accepted_tokens_match_those_without_drafts(llama_dir):
    requests = [(random_prompt(7, seed=i), SamplingParams(temperature=0, max_tokens=20, logprobs=3)) for i in range(3)]

    def logprobs_of(spec: dict | None, oracle: Oracle | None) -> dict:
        engine = make_engine(llama_dir, speculative_config=spec)
        if oracle is not None:
            engine.drafter.proposer = oracle  # type: ignore[union-attr, assignment]
        for i, (prompt, params) in enumerate(requests):
            engine.add_request(AddRequest(f"r{i}", prompt, params))
        entries: dict[str, list] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.new_logprobs is not None and len(out.new_logprobs) == len(out.new_token_ids)
                entries.setdefault(out.request_id, []).extend(out.new_logprobs)
        return entries

    plain = logprobs_of(None, None)
    tokens = {f"{rid}#0": (7, [next(iter(entry)) for entry in entries]) for rid, entries in plain.items()}
    drafted = logprobs_of(NGRAM, Oracle(tokens, wrong_at=(3,)))
    for rid, entries in plain.items():
        assert len(drafted[rid]) == len(entries)
        for ours, theirs in zip(drafted[rid], entries):
            assert ours.keys() == theirs.keys()
            for token_id, (logprob, rank) in theirs.items():
                assert ours[token_id][0] == pytest.approx(logprob, abs=1e-4) and ours[token_id][1] == rank


def test_stops_min_tokens_and_max_tokens_inside_a_draft(llama_dir):
    free, _ = run(llama_dir, [(random_prompt(6 + i, seed=i), SamplingParams(temperature=0, max_tokens=30))
                              for i in range(8)])
    requests = []
    for i in range(8):
        tokens = free.tokens[(f"r{i}", 0)]
        stop = tokens[min(7, len(tokens) - 1)]
        requests.append((random_prompt(6 + i, seed=i), SamplingParams(
            temperature=0, max_tokens=11 + i, stop_token_ids=[stop], min_tokens=9 if i % 2 else 0)))
    drafted, _ = assert_same_with_oracle(llama_dir, requests)
    assert any(final.stop_reason is not None for final in drafted.finals.values())
    assert any(final.finish_reason == "length" for final in drafted.finals.values())


def test_n_samples_preemption_and_overlapped_scheduling_with_drafts(llama_dir):
    requests = [(random_prompt(20 + 3 * i, seed=i), SamplingParams(
        temperature=0.8, seed=i, n=2, max_tokens=30, ignore_eos=True)) for i in range(5)]
    drafted, engine = assert_same_with_oracle(llama_dir, requests, wrong_at=(3,), num_kv_blocks=16,
                                              max_num_batched_tokens=64)
    assert engine.stats().num_preemptions > 0
    assert_same_with_oracle(llama_dir, requests[:3], wrong_at=(3,), async_scheduling=True)


def test_drafting_pauses_for_a_request_whose_drafts_miss(llama_dir):
    requests = [(random_prompt(9, seed=1), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))]
    _, engine = assert_same_with_oracle(llama_dir, requests, wrong_at=(0,))
    stats = engine.drafter.stats  # type: ignore[union-attr]
    assert stats.num_accepted_tokens == 0
    assert stats.num_drafts <= 5  # of its 59 decode steps: two misses, then pauses of 16, 32, 64 steps


def test_no_drafts_in_a_step_of_more_requests_than_disable_by_batch_size(llama_dir):
    requests = [(random_prompt(5, seed=i) * 3, SamplingParams(temperature=0, max_tokens=8)) for i in range(6)]
    plain, _ = run(llama_dir, requests)
    drafted, engine = run(llama_dir, requests, {**NGRAM, "disable_by_batch_size": 4})
    assert results(drafted) == results(plain)
    assert engine.drafter.stats.num_drafts == 0  # type: ignore[union-attr]


def test_constrained_requests_draft_within_their_grammar(llama_dir):
    """The grammar checks each drafted token (a draft stops where the grammar would refuse it) and masks each
    drafted position after the drafts before it: outputs are the same, drafts are accepted."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"]}
    constrained = [
        SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=schema)),
        SamplingParams(temperature=0.9, seed=3, max_tokens=40, structured_outputs=StructuredOutputsParams(
            regex=r"(ab|cd){3,12}")),
        SamplingParams(temperature=0, max_tokens=10, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
    ]
    requests = [(random_prompt(9, seed=i), params) for i, params in enumerate(constrained)]
    requests.append((random_prompt(9, seed=7), SamplingParams(temperature=0, max_tokens=20)))
    for wrong_at in ((), (2,)):
        _, engine = assert_same_with_oracle(llama_dir, requests, wrong_at=wrong_at)
        assert engine.drafter.stats.num_accepted_tokens > 0  # type: ignore[union-attr]


def test_a_draft_the_grammar_refuses_is_cut_before_it_is_verified(llama_dir):
    engine = make_engine(llama_dir, speculative_config=NGRAM)
    params = SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(
        regex=r"(ab)+"))
    engine.add_request(AddRequest("r", [5, 6, 7], params))
    while not engine.structured_output.matchers:  # compiled; no token sampled yet
        engine.structured_output.wait_for_compile(timeout=1.0)
        engine._admit_compiled()
    tokenizer = engine.structured_output._tokenizer
    assert tokenizer is not None
    ab, cd = tokenizer.encode("ababab", add_special_tokens=False), tokenizer.encode("cd", add_special_tokens=False)
    assert engine.structured_output.valid_draft("r#0", ab + cd) == ab
    assert engine.structured_output.valid_draft("r#0", cd + ab) == []
    assert engine.structured_output.valid_draft("r#0", ab) == ab  # the matcher was left where it was
    run_all(engine)


def test_sessions_keep_their_kv_with_drafts(llama_dir):
    """A session's turn with drafts leaves the same leased blocks as without, and its next turn finds them."""
    first = random_prompt(40, seed=3)

    def two_turns(spec: dict | None) -> tuple[list[int], int]:
        engine = make_engine(llama_dir, speculative_config=spec)
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        engine.add_request(AddRequest("t1", first, params, session_id="s"))
        reply = run_all(engine, leases=True).tokens[("t1", 0)]
        engine.add_request(AddRequest("t2", first + reply + [7, 8, 9], params, session_id="s"))
        run = run_all(engine, leases=True)
        return run.tokens[("t2", 0)], run.firsts[("t2", 0)].num_cached_tokens

    plain, drafted = two_turns(None), two_turns({**NGRAM, "prompt_lookup_min": 1})
    assert drafted == plain and plain[1] >= 48  # the second turn found the first turn's blocks


def test_a_steps_drafts_are_shared_out_within_max_tokens_per_step(llama_dir):
    requests = [(random_prompt(9, seed=i), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
                for i in range(6)]
    plain, _ = run(llama_dir, requests)
    engine = make_engine(llama_dir, speculative_config={**NGRAM, "num_speculative_tokens": 5,
                                                        "max_tokens_per_step": 12})
    engine.drafter.proposer = Oracle(reference_of(plain, requests))  # type: ignore[union-attr, assignment]
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(AddRequest(f"r{i}", prompt, params))
    schedule, drafted_steps = engine.scheduler.schedule, []

    def recording_schedule():
        out = schedule()
        if out.spec_token_ids:
            drafted_steps.append((len(out.num_scheduled_tokens), max(map(len, out.spec_token_ids.values()))))
        return out

    engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    assert results(run_all(engine)) == results(plain)
    # six requests decoding: (12 - 6) // 6 = 1 drafted token each
    assert drafted_steps and all(longest == 1 for num, longest in drafted_steps if num == 6)


def test_no_stale_draft_once_the_batch_outgrows_disable_by_batch_size(llama_dir):
    """Drafts made while the batch was small are not scheduled in a later step where drafting is off."""
    requests = [(random_prompt(9, seed=i), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
                for i in range(4)]
    plain, _ = run(llama_dir, requests)
    engine = make_engine(llama_dir, speculative_config={**NGRAM, "disable_by_batch_size": 2})
    engine.drafter.proposer = Oracle(reference_of(plain, requests))  # type: ignore[union-attr, assignment]
    schedule, drafted_with = engine.scheduler.schedule, []

    def recording_schedule():
        running = len(engine.scheduler.running)  # what the drafter saw: waiting requests are admitted behind it
        out = schedule()
        if out.spec_token_ids:
            drafted_with.append(running)
        return out

    engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    for i, (prompt, params) in enumerate(requests[:2]):
        engine.add_request(AddRequest(f"r{i}", prompt, params))
    early = Run()
    for _ in range(4):
        for out in engine.step():
            early.add(out)
    for i, (prompt, params) in enumerate(requests[2:], 2):
        engine.add_request(AddRequest(f"r{i}", prompt, params))
    assert results(run_all(engine, early)) == results(plain)
    assert drafted_with and max(drafted_with) <= 2
