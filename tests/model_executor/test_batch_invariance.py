"""Batch-invariant mode (PAGEDSERVE_BATCH_INVARIANT=1, vLLM's VLLM_BATCH_INVARIANT): the default model's greedy
tokens and their logprobs are bit-identical alone and inside batches of 2, 5 and 17 (one row, a few rows and more
than 16 rows: the sizes where the default kernels switch). By default a decode step of more rows takes other
kernels (dequantize + matmul, or AMX tiles) than a single row's GEMV."""

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.model_files import default_model_path
from pagedserve.native.build import batch_invariant

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"
OTHERS = [f"Question {i}: why is the sky blue? Answer in {i % 5 + 2} sentences and list {i % 7 + 3} colors."
          for i in range(16)]


@pytest.mark.parametrize("variable", ["PAGEDSERVE_BATCH_INVARIANT", "VLLM_BATCH_INVARIANT"])
def test_either_variable_switches_the_mode_on(monkeypatch, variable):
    assert not batch_invariant()
    monkeypatch.setenv(variable, "1")
    assert batch_invariant()


def test_greedy_is_the_same_alone_and_in_any_batch(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_BATCH_INVARIANT", "1")
    llm = LLM(default_model_path(), max_num_seqs=17, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1)

    def first(batch: list[str]):
        out = llm.generate(batch, params, use_tqdm=False)[0].outputs[0]
        return list(out.token_ids), [{t: lp.logprob for t, lp in step.items()} for step in out.logprobs]

    alone = first([PROMPT])
    for size in (2, 5, 17):
        assert first([PROMPT, *OTHERS[:size - 1]]) == alone, size
