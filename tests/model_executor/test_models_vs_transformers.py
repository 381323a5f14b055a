"""Greedy tokens and logprobs equal transformers' on the same weights, float32, in every engine mode."""

import random

import pytest
import torch
from conftest import ARCHITECTURES
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams

MAX_TOKENS = 8
PROMPT_LENS = [1, 2, 5, 15, 16, 17, 31, 33, 64, 100, 200, 300]


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 512) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def references(checkpoints) -> dict[str, list[tuple[list[int], list[float]]]]:
    """transformers' greedy continuation of each prompt, and the log-softmax of each chosen token."""
    refs = {}
    for arch, path in checkpoints.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        refs[arch] = []
        for prompt in make_prompts():
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                    output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                )
            tokens = out.sequences[0, len(prompt):].tolist()
            logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
            refs[arch].append((tokens, logprobs))
    return refs


def run(path: str, **engine_kwargs) -> tuple[list, dict]:
    engine_kwargs.setdefault("num_kv_blocks", 256)  # room for the whole batch, without zero-filling GiBs
    llm = LLM(path, dtype="float32", max_model_len=512, **engine_kwargs)
    # min_tokens, like the reference's min_new_tokens, bans EOS (ignore_eos alone would let it be chosen)
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                            logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in make_prompts()], params, use_tqdm=False)
    stats = llm.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total, "KV blocks leaked"
    return outs, stats


def check(outs, refs) -> None:
    for out, (ref_tokens, ref_logprobs) in zip(outs, refs):
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        chosen = [entry[t].logprob for entry, t in zip(completion.logprobs, completion.token_ids)]
        assert chosen == pytest.approx(ref_logprobs, abs=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_one_batch(checkpoints, references, arch):
    outs, _ = run(checkpoints[arch])
    check(outs, references[arch])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_chunked_prefill(checkpoints, references, arch):
    outs, _ = run(checkpoints[arch], max_num_batched_tokens=32)
    check(outs, references[arch])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_preemption(checkpoints, references, arch):
    # 24 blocks of 16 = 384 tokens: the 300-token prompt fits alone; admitted requests outgrow the pool
    outs, stats = run(checkpoints[arch], num_kv_blocks=24)
    assert stats.num_preemptions > 0
    check(outs, references[arch])


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_block_sizes(checkpoints, references, arch, block_size):
    outs, _ = run(checkpoints[arch], block_size=block_size, max_num_batched_tokens=64)
    check(outs, references[arch])


def test_single_request_matches_batch(checkpoints, references):
    llm = LLM(checkpoints["llama"], dtype="float32", max_model_len=512)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for prompt, (ref_tokens, _) in zip(make_prompts(), references["llama"]):
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref_tokens


def test_sharded_safetensors_checkpoint(tmp_path, references):
    """A checkpoint saved in several shards (model.safetensors.index.json) loads to the same outputs."""
    from conftest import make_checkpoint

    path = str(tmp_path / "sharded")
    make_checkpoint(path, "llama", max_shard_size="100KB")
    import os

    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    outs, _ = run(path)
    check(outs, references["llama"])
