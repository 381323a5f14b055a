import math
from collections import Counter

import pytest
import torch

import pagedserve.model_executor.layers.sampler as sampler_module
from pagedserve.model_executor.layers.sampler import Sampler, SamplingMetadata, gather_logprobs
from pagedserve.sampling_params import SamplingParams

CPU = torch.device("cpu")
# A controlled 8-token distribution; ids are deliberately not in probability order.
PROBS = [0.05, 0.30, 0.02, 0.18, 0.10, 0.25, 0.07, 0.03]
LOGITS = [math.log(p) + 1.7 for p in PROBS]  # the shift must not matter
NUM_DRAWS = 20_000


def make_metadata(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    banned: list[list[int]] | None = None,
) -> SamplingMetadata:
    rows = len(params)
    return SamplingMetadata.from_rows(
        params,
        prompts if prompts is not None else [[] for _ in range(rows)],
        outputs if outputs is not None else [[] for _ in range(rows)],
        generators if generators is not None else [None] * rows,
        banned if banned is not None else [[] for _ in range(rows)],
        CPU,
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_distribution(params: SamplingParams, logits: list[float]) -> list[float]:
    """Sampling distribution straight from the definitions: temperature, top-k, top-p, min-p."""
    scaled = [x / params.temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    probs = [w / sum(weights) for w in weights]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(order[: params.top_k] if params.top_k > 0 else order)
    if params.top_p < 1.0:
        mass = sum(probs[i] for i in keep)
        nucleus, cumulative = set(), 0.0
        for i in (i for i in order if i in keep):
            nucleus.add(i)
            cumulative += probs[i] / mass
            if cumulative >= params.top_p:
                break
        keep = nucleus
    if params.min_p > 0.0:
        best = max(probs[i] for i in keep)
        keep = {i for i in keep if probs[i] >= params.min_p * best}
    total = sum(probs[i] for i in keep)
    return [probs[i] / total if i in keep else 0.0 for i in range(len(probs))]


def empirical_distributions(configs: list[SamplingParams], draws: int = NUM_DRAWS) -> list[list[float]]:
    """Samples every config ``draws`` times in one batch (configs interleaved row by row)."""
    torch.manual_seed(1234)
    params = configs * draws
    logits = torch.tensor(LOGITS).repeat(len(params), 1)
    tokens = Sampler()(logits, make_metadata(params)).sampled_token_ids.view(draws, len(configs))
    counts = [torch.bincount(tokens[:, c], minlength=len(LOGITS)) for c in range(len(configs))]
    return [(c.double() / draws).tolist() for c in counts]


def assert_matches(observed: list[float], expected: list[float], draws: int) -> None:
    for token, (got, want) in enumerate(zip(observed, expected, strict=True)):
        if want == 0.0:
            assert got == 0.0, f"token {token} must never be sampled, got frequency {got}"
        else:
            tolerance = 5 * math.sqrt(want * (1 - want) / draws) + 1e-3
            assert abs(got - want) <= tolerance, f"token {token}: frequency {got:.4f}, expected {want:.4f}"


def test_reference_distribution_sanity() -> None:
    # Hand-checked against the definitions so the reference itself can't drift.
    support = lambda p: {i for i, x in enumerate(reference_distribution(p, LOGITS)) if x > 0}
    assert support(SamplingParams(top_k=3)) == {1, 5, 3}
    assert support(SamplingParams(top_p=0.6)) == {1, 5, 3}  # .30 + .25 = .55 < .6 <= .73
    assert support(SamplingParams(top_p=0.8)) == {1, 5, 3, 4}
    assert support(SamplingParams(min_p=0.3)) == {1, 5, 3, 4}  # p >= 0.09
    assert reference_distribution(SamplingParams(), LOGITS) == pytest.approx(PROBS)


def test_temperature_top_k_and_min_p_frequencies() -> None:
    # No row uses top-p, so this exercises the partial-topk path.
    configs = [
        SamplingParams(),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=2.0),
        SamplingParams(top_k=3),
        SamplingParams(top_k=1),
        SamplingParams(top_k=100),
        SamplingParams(temperature=1.5, top_k=5),
        SamplingParams(min_p=0.3),
        SamplingParams(temperature=0.7, min_p=0.1),
    ]
    for config, observed in zip(configs, empirical_distributions(configs), strict=True):
        assert_matches(observed, reference_distribution(config, LOGITS), NUM_DRAWS)


def test_top_p_frequencies() -> None:
    # Rows with and without top-p share one batch: exercises the sorted path with per-row values.
    configs = [
        SamplingParams(top_p=0.6),
        SamplingParams(top_p=0.8),
        SamplingParams(top_p=0.1),
        SamplingParams(top_p=1.0),
        SamplingParams(temperature=2.0, top_p=0.7),
        SamplingParams(top_k=3),
        SamplingParams(temperature=1.3, top_k=5, top_p=0.9, min_p=0.2),
    ]
    for config, observed in zip(configs, empirical_distributions(configs), strict=True):
        assert_matches(observed, reference_distribution(config, LOGITS), NUM_DRAWS)


def test_top_p_frequencies_when_every_row_has_top_k() -> None:
    # All rows are top-k bounded: exercises top-p over the max_top_k candidates instead of a full sort.
    configs = [
        SamplingParams(top_k=5, top_p=0.7),
        SamplingParams(top_k=3, top_p=0.9),
        SamplingParams(top_k=6, top_p=0.95, temperature=1.3, min_p=0.1),
        SamplingParams(top_k=2),
    ]
    for config, observed in zip(configs, empirical_distributions(configs), strict=True):
        assert_matches(observed, reference_distribution(config, LOGITS), NUM_DRAWS)


def test_seeded_rows_follow_the_distribution() -> None:
    rows, steps = 64, 100
    params = SamplingParams(temperature=1.5, seed=0)
    generators = [seeded(seed) for seed in range(rows)]
    metadata = make_metadata([params] * rows, generators=generators)
    logits = torch.tensor(LOGITS).repeat(rows, 1)
    tokens = torch.cat([Sampler()(logits, metadata).sampled_token_ids for _ in range(steps)])
    observed = (torch.bincount(tokens, minlength=len(LOGITS)).double() / tokens.numel()).tolist()
    assert_matches(observed, reference_distribution(params, LOGITS), tokens.numel())


def test_greedy_is_argmax_and_mixed_batches_keep_greedy_rows_greedy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 300) * 3
    greedy = Sampler()(logits, make_metadata([SamplingParams(temperature=0.0)] * 16))
    assert torch.equal(greedy.sampled_token_ids, logits.argmax(dim=-1))

    params = [
        SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=5.0) for i in range(16)
    ]
    mixed = Sampler()(logits, make_metadata(params)).sampled_token_ids
    assert torch.equal(mixed[1::2], logits.argmax(dim=-1)[1::2])
    # At temperature 5 over 300 tokens, the random rows are practically never all at their argmax.
    assert not torch.equal(mixed[0::2], logits.argmax(dim=-1)[0::2])


def test_greedy_only_batch_skips_the_random_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("random path used")

    monkeypatch.setattr(sampler_module, "_sample_random", fail)
    logits = torch.randn(4, 50)
    out = Sampler()(logits, make_metadata([SamplingParams(temperature=0.0)] * 4))
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    with pytest.raises(AssertionError, match="random path used"):
        Sampler()(logits, make_metadata([SamplingParams(temperature=0.0), SamplingParams()] * 2))


def test_sampler_does_not_modify_logits() -> None:
    logits = torch.randn(3, 20)
    before = logits.clone()
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, logit_bias={3: 4.0}, top_p=0.5)
    Sampler()(logits, make_metadata([params] * 3, outputs=[[1, 2]] * 3, banned=[[0]] * 3))
    assert torch.equal(logits, before)


def run_seeded(seed: int, logits: torch.Tensor, steps: int) -> list[int]:
    generator = seeded(seed)
    params = SamplingParams(seed=seed)
    return [
        int(Sampler()(logits, make_metadata([params], generators=[generator])).sampled_token_ids[0])
        for _ in range(steps)
    ]


def test_fixed_seed_reproduces_regardless_of_global_rng() -> None:
    logits = torch.randn(1, 1000) * 0.1  # near-uniform, so a chance match is unlikely
    torch.manual_seed(1)
    first = run_seeded(42, logits, steps=10)
    torch.manual_seed(2)
    second = run_seeded(42, logits, steps=10)
    assert first == second
    assert run_seeded(43, logits, steps=10) != first


def test_seeded_row_gives_the_same_token_alone_and_inside_a_batch() -> None:
    torch.manual_seed(0)
    vocab = 1000
    row = torch.randn(1, vocab) * 0.1
    params = SamplingParams(temperature=0.9, top_k=700, seed=7)
    alone = run_seeded_row_in_batch(row, params, others=[], steps=8)
    others = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=99, top_p=0.5),
        SamplingParams(temperature=2.0, min_p=0.05),
    ]
    batched = run_seeded_row_in_batch(row, params, others=others, steps=8)
    assert alone == batched


def run_seeded_row_in_batch(
    row: torch.Tensor, params: SamplingParams, others: list[SamplingParams], steps: int
) -> list[int]:
    """Places the seeded row at index 2 among ``others`` (random logits, own generators where seeded)."""
    position = min(2, len(others))
    batch_params = list(others)
    batch_params.insert(position, params)
    generators = [seeded(p.seed) if p.seed is not None else None for p in batch_params]
    tokens = []
    for _ in range(steps):
        logits = torch.randn(len(batch_params), row.shape[1])
        logits[position] = row[0]
        out = Sampler()(logits, make_metadata(batch_params, generators=generators))
        tokens.append(int(out.sampled_token_ids[position]))
    return tokens


def test_penalties_follow_their_formulas() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 10) * 2
    logits[:, 0] = 1.5  # token 0 is the padding slot's id; it must stay unpenalised unless seen
    params = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.25),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, presence_penalty=-1.0),
        SamplingParams(),
        SamplingParams(presence_penalty=1.0, frequency_penalty=1.0),
    ]
    prompts = [[1, 2, 2], [5], [1, 2, 3], [4, 4]]
    outputs = [[2, 3, 3, 3, 7], [6, 6, 9], [3, 3], []]
    processed = Sampler.apply_logits_processors(logits, make_metadata(params, prompts, outputs))

    expected = logits.clone()
    for row, p in enumerate(params):
        for token in set(prompts[row] + outputs[row]):
            value = float(expected[row, token])
            expected[row, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token, count in Counter(outputs[row]).items():
            expected[row, token] -= p.frequency_penalty * count + p.presence_penalty
    assert torch.allclose(processed, expected, atol=1e-6)
    assert not torch.equal(processed[:2], logits[:2])


def test_logit_bias_and_banned_ids_are_applied() -> None:
    logits = torch.zeros(3, 10)
    logits[:, 6] = 2.0
    params = [
        SamplingParams(logit_bias={4: 2.5, 9: -1.0, 50: 7.0}),  # id 50 is outside the vocab: ignored
        SamplingParams(),
        SamplingParams(logit_bias={6: -1.0}),
    ]
    banned = [[2], [6, 8, 123], []]
    processed = Sampler.apply_logits_processors(logits, make_metadata(params, banned=banned))

    expected = logits.clone()
    expected[0, 4] += 2.5
    expected[0, 9] -= 1.0
    expected[0, 2] = float("-inf")
    expected[1, [6, 8]] = float("-inf")
    expected[2, 6] -= 1.0
    assert torch.equal(processed, expected)

    # A large bias makes a token win both greedily and when sampling.
    forced = [SamplingParams(temperature=0.0, logit_bias={3: 100.0}), SamplingParams(logit_bias={3: 100.0})]
    out = Sampler()(torch.randn(2, 10), make_metadata(forced))
    assert out.sampled_token_ids.tolist() == [3, 3]


def test_banned_ids_are_never_sampled() -> None:
    torch.manual_seed(0)
    banned_ids = [1, 5]  # the two most likely tokens
    params = [SamplingParams(temperature=0.0)] + [SamplingParams(temperature=2.0)] * 5_000
    logits = torch.tensor(LOGITS).repeat(len(params), 1)
    metadata = make_metadata(params, banned=[banned_ids] * len(params))
    tokens = Sampler()(logits, metadata).sampled_token_ids
    assert tokens[0] == 3  # the best token that is not banned
    assert not torch.isin(tokens, torch.tensor(banned_ids)).any()
    assert len(set(tokens.tolist())) == len(LOGITS) - len(banned_ids)


def test_logprobs_come_from_raw_logits_with_ranks_and_sorted_top_k() -> None:
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(5, vocab) * 3
    least_likely = int(logits[3].argmin())
    params = [
        SamplingParams(logprobs=3),
        SamplingParams(),
        SamplingParams(logprobs=5, temperature=0.7, top_k=4, repetition_penalty=1.5, logit_bias={0: 1.0}),
        SamplingParams(logprobs=0, temperature=0.0, logit_bias={least_likely: 1000.0}),
        SamplingParams(logprobs=2, temperature=0.0, presence_penalty=2.0),
    ]
    metadata = make_metadata(params, prompts=[[1, 2]] * 5, outputs=[[3, 3]] * 5)
    out = Sampler()(logits, metadata)

    raw = torch.log_softmax(logits, dim=-1)
    sampled = out.sampled_token_ids
    assert (
        out.logprob_token_ids is not None and out.logprobs is not None and out.sampled_token_ranks is not None
    )
    assert out.logprob_token_ids.shape == (5, 6) and out.logprobs.shape == (5, 6)
    assert torch.equal(out.logprob_token_ids[:, 0], sampled)
    assert torch.allclose(out.logprobs, raw.gather(1, out.logprob_token_ids))
    top_values, _ = raw.sort(dim=-1, descending=True)
    assert torch.allclose(out.logprobs[:, 1:], top_values[:, :5])
    for row in range(5):
        ids = out.logprob_token_ids[row, 1:].tolist()
        assert ids == sorted(range(vocab), key=lambda t: -float(raw[row, t]))[:5]
        expected_rank = 1 + sum(float(raw[row, t]) > float(raw[row, sampled[row]]) for t in range(vocab))
        assert int(out.sampled_token_ranks[row]) == expected_rank
    # The bias made row 3 pick its least likely token, but logprobs and rank describe the raw logits.
    assert int(sampled[3]) == least_likely
    assert int(out.sampled_token_ranks[3]) == vocab
    assert float(out.logprobs[3, 0]) == pytest.approx(float(raw[3].min()))


def test_no_logprobs_requested_gives_none_and_zero_gives_only_the_sampled_token() -> None:
    logits = torch.randn(2, 30)
    out = Sampler()(logits, make_metadata([SamplingParams(), SamplingParams(temperature=0.0)]))
    assert out.logprob_token_ids is None and out.logprobs is None and out.sampled_token_ranks is None

    out = Sampler()(logits, make_metadata([SamplingParams(logprobs=0), SamplingParams()]))
    assert out.logprob_token_ids is not None and out.logprobs is not None
    assert out.logprob_token_ids.shape == (2, 1)
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)


def test_gather_logprobs_for_prompt_positions() -> None:
    logprobs = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0], [3.0, 3.0, 0.0]]), dim=-1)
    ids, values, ranks = gather_logprobs(logprobs, 2, torch.tensor([2, 0]))
    assert ids.tolist() == [[2, 1, 2], [0, 0, 1]] or ids.tolist() == [[2, 1, 2], [0, 1, 0]]
    assert torch.equal(values, logprobs.gather(1, ids))
    assert ranks.tolist() == [2, 1]  # ties share the better rank


def test_from_rows_flags_and_tensors() -> None:
    params = [
        SamplingParams(temperature=0.0, seed=5, logprobs=2),
        SamplingParams(temperature=0.8, top_k=7, seed=3),
        SamplingParams(top_p=0.9, min_p=0.1, logprobs=4),
    ]
    generators = [seeded(5), seeded(3), None]
    metadata = make_metadata(params, generators=generators, banned=[[1], [], [2, 3]])
    assert metadata.temperature.tolist() == pytest.approx([0.0, 0.8, 1.0])
    assert metadata.top_k.dtype == torch.int64 and metadata.top_k.tolist() == [0, 7, 0]
    assert list(metadata.generators) == [1]  # greedy rows never consume their generator
    assert not metadata.all_greedy and not metadata.all_random
    assert not metadata.no_top_k and not metadata.no_top_p and not metadata.no_min_p
    assert metadata.max_top_k == 7 and metadata.max_num_logprobs == 4
    assert not metadata.top_k_on_every_random_row  # row 2 samples without top-k
    assert make_metadata(params[:2]).top_k_on_every_random_row  # the greedy row doesn't count
    assert metadata.output_token_ids is None and metadata.seen_token_ids is None
    assert metadata.banned_index is not None and metadata.banned_index.tolist() == [[0, 2, 2], [1, 2, 3]]

    plain = make_metadata([SamplingParams()] * 2)
    assert plain.all_random and plain.no_top_k and plain.no_top_p and plain.no_min_p
    assert plain.max_num_logprobs is None and plain.banned_index is None and plain.logit_bias_index is None


def test_from_rows_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        SamplingMetadata.from_rows([SamplingParams()] * 2, [[]], [[], []], [None, None], [[], []], CPU)


def test_hand_built_metadata_with_defaults() -> None:
    # Only the per-row tensors: no flags, unknown max token id (out-of-vocab bans filtered on the device).
    logits = torch.randn(3, 12)
    metadata = SamplingMetadata(
        temperature=torch.tensor([0.0, 1.0, 0.0]),
        top_p=torch.ones(3),
        top_k=torch.zeros(3, dtype=torch.int64),
        min_p=torch.zeros(3),
        presence_penalty=torch.zeros(3),
        frequency_penalty=torch.zeros(3),
        repetition_penalty=torch.ones(3),
        banned_index=torch.tensor([[2, 2], [int(logits[2].argmax()), 99]]),
    )
    tokens = Sampler()(logits, metadata).sampled_token_ids
    assert int(tokens[0]) == int(logits[0].argmax())
    assert int(tokens[2]) == int(logits[2].topk(2).indices[1])


def bitmask_of(allowed: list[set[int]], width_words: int) -> torch.Tensor:
    """Rows of an int32 token bitmask: bit t % 32 of word t // 32 set = token t allowed."""
    words = [[0] * width_words for _ in allowed]
    for row, tokens in enumerate(allowed):
        for t in tokens:
            words[row][t // 32] |= 1 << (t % 32)
    return torch.tensor(words, dtype=torch.int64).to(torch.int32)  # bit 31 wraps to the sign bit


def test_grammar_bitmask_restricts_sampling_and_logprobs() -> None:
    """Rows 0 and 2 are constrained (the bitmask is wider than the 40-token vocabulary), row 1 is not. Only
    allowed tokens are sampled, greedy takes the best allowed one, and logprobs are those of the masked logits
    (as vLLM's): -inf outside the grammar, renormalised over the allowed tokens."""
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 3
    before = logits.clone()
    allowed = [{1, 31, 39}, {0, 5, 32}]
    params = [SamplingParams(temperature=2.0, logprobs=2), SamplingParams(temperature=2.0),
              SamplingParams(temperature=0.0, logprobs=0)]
    metadata = make_metadata(params)
    metadata.grammar_bitmask, metadata.grammar_rows = bitmask_of(allowed, 3), [0, 2]
    seen: list[set[int]] = [set(), set(), set()]
    for _ in range(300):
        out = Sampler()(logits, metadata)
        for row, token in enumerate(out.sampled_token_ids.tolist()):
            seen[row].add(token)
    assert seen[0] == allowed[0] and seen[2] == {max(allowed[1], key=lambda t: float(logits[2, t]))}
    assert len(seen[1]) > 3 and not seen[1] <= allowed[0]
    masked = logits.clone()
    for row, tokens in ((0, allowed[0]), (2, allowed[1])):
        masked[row, [t for t in range(40) if t not in tokens]] = float("-inf")
    expected = torch.log_softmax(masked, dim=-1)
    assert out.logprobs is not None and out.logprob_token_ids is not None
    assert torch.equal(out.logprobs, expected.gather(1, out.logprob_token_ids))
    assert out.logprobs[0, 0].exp() > torch.softmax(logits, dim=-1)[0, out.sampled_token_ids[0]]
    assert torch.equal(logits, before)


def test_grammar_bitmask_matches_xgrammar_on_every_bit() -> None:
    xgrammar = pytest.importorskip("xgrammar")
    torch.manual_seed(1)
    logits = torch.randn(5, 100)
    bitmask = torch.randint(-(2**31), 2**31, (5, 4), dtype=torch.int64).to(torch.int32)  # 128 bits > 100
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bitmask, vocab_size=100)
    assert torch.equal(sampler_module.apply_grammar_bitmask(logits, bitmask, None), expected)
    rows = [1, 4]  # the bitmask's two rows are those logits rows; the others stay as they are
    expected = logits.clone()
    full = torch.full((5, 4), -1, dtype=torch.int32).index_copy(0, torch.tensor(rows), bitmask[:2])
    xgrammar.apply_token_bitmask_inplace(expected, full, vocab_size=100)
    assert torch.equal(sampler_module.apply_grammar_bitmask(logits, bitmask[:2], rows), expected)
