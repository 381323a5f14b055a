"""Prompt logprobs (`SamplingParams.prompt_logprobs`, vLLM's semantics) equal transformers' on the same weights in
float32: alone and batched, with chunked prefill, where the prefix cache would have served the prompt, under
preemption, and with n > 1."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams

PROMPT_LENS = [1, 2, 17, 40, 100, 300]
K = 3


def make_prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(5, 512) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def references(llama_dir) -> list[torch.Tensor]:
    """transformers' log-softmax at each prompt position: row i predicts prompt token i + 1."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0, :-1].float().log_softmax(-1) for p in make_prompts()]


def generate(llm: LLM, prompts: list[list[int]], **params) -> list:
    params = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "prompt_logprobs": K, **params}
    return llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**params), use_tqdm=False)


def check(out, prompt: list[int], reference: torch.Tensor) -> None:
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for position in range(1, len(prompt)):
        entry, row, token = got[position], reference[position - 1], prompt[position]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        assert isinstance(entry[token].decoded_token, str)
        top = sorted((lp for lp in entry.values() if lp.rank <= K), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == list(range(1, K + 1))
        assert [lp.logprob for lp in top] == pytest.approx(row.topk(K).values.tolist(), abs=1e-4)


def assert_no_leaks(llm: LLM) -> None:
    stats = llm.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_alone_and_batched(llama_dir, references):
    llm = LLM(llama_dir, dtype="float32", max_model_len=512, num_kv_blocks=256)
    prompts = make_prompts()
    for prompt, reference in zip(prompts, references):
        check(generate(llm, [prompt])[0], prompt, reference)
    for out, prompt, reference in zip(generate(llm, prompts), prompts, references):
        check(out, prompt, reference)
    without = generate(llm, prompts[:1], prompt_logprobs=None)[0]
    assert without.prompt_logprobs is None
    assert_no_leaks(llm)


def test_chunked_prefill_and_a_prompt_the_cache_holds(llama_dir, references):
    llm = LLM(llama_dir, dtype="float32", max_model_len=512, num_kv_blocks=256, max_num_batched_tokens=32,
              enable_prefix_caching=True)
    prompts = make_prompts()
    generate(llm, prompts, prompt_logprobs=None)  # now every prompt's full blocks are cached
    hits = llm.stats().prefix_cache_hits
    for out, prompt, reference in zip(generate(llm, prompts), prompts, references):
        check(out, prompt, reference)  # computed again, not served from the cache (as vLLM)
    assert llm.stats().prefix_cache_hits == hits
    generate(llm, prompts, prompt_logprobs=None)
    assert llm.stats().prefix_cache_hits > hits  # requests without prompt logprobs still hit
    assert_no_leaks(llm)


def test_preemption(llama_dir, references):
    # 24 blocks of 16 = 384 tokens: the 300-token prompt fits alone; admitted requests outgrow the pool
    llm = LLM(llama_dir, dtype="float32", max_model_len=512, num_kv_blocks=24, max_num_batched_tokens=64)
    prompts = make_prompts()
    outs = generate(llm, prompts, max_tokens=40)
    assert llm.stats().num_preemptions > 0
    for out, prompt, reference in zip(outs, prompts, references):
        check(out, prompt, reference)
    assert_no_leaks(llm)


def test_n_samples_share_one_prompt(llama_dir, references):
    llm = LLM(llama_dir, dtype="float32", max_model_len=512, num_kv_blocks=256)
    prompt, reference = make_prompts()[3], references[3]
    out = generate(llm, [prompt], n=3, temperature=1.0, seed=1)[0]
    assert len(out.outputs) == 3
    check(out, prompt, reference)
    assert_no_leaks(llm)


def test_out_of_range_is_refused(llama_dir):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-2)
