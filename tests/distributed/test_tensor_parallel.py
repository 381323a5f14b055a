"""tensor_parallel_size=2 (worker processes, gloo) against one rank, on the tiny checkpoints in float32: the same
greedy tokens and logprobs to 1e-4, with chunked prefill, prefix-cache hits, preemption, n > 1, seeds, grammars and
async scheduling; the KV cache split by heads; bad splits and dead workers fail cleanly, and no worker outlives its
engine."""

import os
import signal
import time

import httpx
import pytest
from conftest import make_checkpoint
from entrypoints.openai.server_utils import ServerProcess

from pagedserve import LLM, SamplingParams
from pagedserve.distributed import parallel_state
from pagedserve.executor.base import WorkerFailed
from pagedserve.sampling_params import StructuredOutputsParams

TINY = dict(dtype="float32", max_model_len=256)


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    return children


def worker_pids(root: int | None = None) -> list[int]:
    """The live tensor-parallel worker processes below `root` (this process by default)."""
    children, found, todo = _children(), [], [root or os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"pagedserve.executor.worker_process" in f.read():
                        found.append(pid)
            except OSError:
                pass
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run(path: str, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], **engine) -> tuple:
    """Greedy (or seeded) outputs of an engine, its stats after the run, and its KV cache layout."""
    llm = LLM(path, **{**TINY, **engine})
    try:
        shm = engine.get("tensor_parallel_size", 1) > 1 and os.environ.get("PAGEDSERVE_TP_ALL_REDUCE") != "gloo"
        assert (parallel_state._shm is not None) == shm  # the CPU's ranks sum through shared memory by default
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runner = llm.engine.model_runner
        driver = getattr(runner, "driver", runner)
        return outputs, llm.stats(), tuple(driver.kv_caches[0].shape)
    finally:
        llm.engine.shutdown()


def assert_same(expected: list, actual: list) -> None:
    for want, got in zip(expected, actual, strict=True):
        assert len(want.outputs) == len(got.outputs)
        for a, b in zip(want.outputs, got.outputs):
            assert a.token_ids == b.token_ids
            for step_a, step_b in zip(a.logprobs or [], b.logprobs or []):
                assert step_a.keys() == step_b.keys()
                for token, logprob in step_a.items():
                    assert abs(logprob.logprob - step_b[token].logprob) < 1e-4


PROMPTS = [[5 + i, 17, 33 + i, 100, 7] * (1 + 2 * i) for i in range(8)]


@pytest.fixture(scope="module")
def odd_vocab_llama(tmp_path_factory) -> str:
    """A vocabulary of 509 (padded to 2 x 255 rows) with the head tied to the embedding."""
    return make_checkpoint(str(tmp_path_factory.mktemp("tp") / "llama"), "llama", vocab_size=509,
                           tie_word_embeddings=True)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe", "phi3", "gpt2", "gemma3", "qwen3"])
def test_tp2_equals_tp1(checkpoints, arch, monkeypatch):
    """Heads, MLP slices and (MoE) experts split by rank; Phi-3's and GPT-2's checkpoints store q/k/v fused.
    Mixtral's ranks sum through gloo instead of shared memory."""
    if arch == "mixtral":
        monkeypatch.setenv("PAGEDSERVE_TP_ALL_REDUCE", "gloo")  # the workers inherit it
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
    one, _, _ = run(checkpoints[arch], PROMPTS, params, num_kv_blocks=64)
    two, _, _ = run(checkpoints[arch], PROMPTS, params, num_kv_blocks=64, tensor_parallel_size=2)
    assert_same(one, two)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_tp2_under_chunked_prefill_prefix_hits_preemption_and_n(odd_vocab_llama, async_scheduling):
    shared = [300 + i % 50 for i in range(48)]  # a prefix of three blocks every prompt shares
    prompts = [shared + p for p in PROMPTS]
    params = [SamplingParams(max_tokens=24, temperature=0, logprobs=2, ignore_eos=True)] * 6 + [
        SamplingParams(max_tokens=16, temperature=0.9, seed=11, n=2),  # n > 1: the prompt's blocks shared
        SamplingParams(max_tokens=16, temperature=0.8, seed=3,
                       structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"])),
    ]
    # 24 blocks of 16 cannot hold 8 prompts of ~60-100 tokens and their outputs: requests are preempted
    engine = dict(num_kv_blocks=24, max_num_batched_tokens=32, async_scheduling=async_scheduling)
    one, stats_one, cache_one = run(odd_vocab_llama, prompts, params, **engine)
    two, stats, cache = run(odd_vocab_llama, prompts, params, tensor_parallel_size=2, **engine)
    assert_same(one, two)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total  # no block leaked
    assert cache[1] == cache_one[1] // 2  # each rank holds half the KV heads of every block


def test_tp2_with_speculative_drafts_equals_tp1_without(odd_vocab_llama):
    """Every rank verifies the drafts from rank 0's sampled ids of every drafted position, and accepts the same."""
    params = [SamplingParams(max_tokens=20, temperature=0, logprobs=2), SamplingParams(max_tokens=20, temperature=0.9,
                                                                                       seed=4)]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    one, _, _ = run(odd_vocab_llama, PROMPTS, params * 4, num_kv_blocks=64)
    two, stats, _ = run(odd_vocab_llama, PROMPTS, params * 4, num_kv_blocks=64, tensor_parallel_size=2,
                        speculative_config=spec)
    assert_same(one, two)
    assert stats.spec_num_drafts > 0 and stats.num_kv_blocks_free == stats.num_kv_blocks_total


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tp4_shares_each_of_two_kv_heads_between_two_ranks(checkpoints, arch):
    """4 query heads, 2 key/value heads, 4 ranks: each rank holds one query head and the key/value head it uses."""
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
    one, _, _ = run(checkpoints[arch], PROMPTS[:4], params, num_kv_blocks=64)
    four, _, cache = run(checkpoints[arch], PROMPTS[:4], params, num_kv_blocks=64, tensor_parallel_size=4)
    assert_same(one, four)
    assert cache[1] == 1


def test_kv_budget_is_per_rank(llama_dir):
    """The same KV memory per rank holds twice the blocks when each block holds half the heads."""
    budget = dict(kv_cache_memory_bytes=1 << 20)
    _, one, _ = run(llama_dir, PROMPTS[:1], SamplingParams(max_tokens=1), **budget)
    _, two, _ = run(llama_dir, PROMPTS[:1], SamplingParams(max_tokens=1), tensor_parallel_size=2, **budget)
    assert two.num_kv_blocks_total == 2 * one.num_kv_blocks_total


def test_int8_weights_split_across_ranks(llama_dir):
    """Quantize-at-load runs on each rank's shard (per-channel scales of its own rows)."""
    llm = LLM(llama_dir, **TINY, num_kv_blocks=64, quantization="int8", tensor_parallel_size=2)
    try:
        layer = llm.engine.model_runner.model.model.layers[0]
        method = layer.self_attn.o_proj.quant_method
        assert type(method).__name__ == "QuantizeAtLoad" and type(method.format).__name__ == "Int8Format"
        assert layer.self_attn.o_proj.in_features == 32  # half of hidden 64: a row-parallel shard
        out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=8, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 8
    finally:
        llm.engine.shutdown()


def test_a_split_that_does_not_divide_is_a_value_error_and_leaves_no_worker(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor_parallel_size=3"):
        LLM(llama_dir, **TINY, num_kv_blocks=64, tensor_parallel_size=3)
    odd_mlp = make_checkpoint(str(tmp_path / "odd"), "llama", intermediate_size=65)
    with pytest.raises(ValueError, match="size=65 is not divisible by tensor_parallel_size=2"):  # found by each rank
        LLM(odd_mlp, **TINY, num_kv_blocks=64, tensor_parallel_size=2)
    assert worker_pids() == []


def test_one_tensor_parallel_engine_per_process(llama_dir):
    """The group belongs to the process: a second engine is refused and the first one keeps working."""
    llm = LLM(llama_dir, **TINY, num_kv_blocks=64, tensor_parallel_size=2)
    try:
        for tp in (2, 1):
            with pytest.raises(ValueError, match="one tensor-parallel engine per process"):
                LLM(llama_dir, **TINY, num_kv_blocks=64, tensor_parallel_size=tp)
        out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
        assert len(worker_pids()) == 1
    finally:
        llm.engine.shutdown()


def test_a_dead_worker_fails_the_engine_at_once(llama_dir):
    llm = LLM(llama_dir, **TINY, num_kv_blocks=64, tensor_parallel_size=2)
    try:
        [pid] = worker_pids()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        start = time.monotonic()
        with pytest.raises(WorkerFailed, match="worker 1"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=4), use_tqdm=False)
        assert time.monotonic() - start < 30
    finally:
        llm.engine.shutdown()
    assert worker_pids() == []
    assert not [name for name in os.listdir("/dev/shm") if name.startswith("pagedserve-tp-")]  # unlinked at start


def test_server_with_tp2_answers_as_one_rank_and_stops_its_workers(checkpoints):
    """Through the CLI (`-tp 2`): the engine process, a daemon, starts its worker; SIGTERM stops both."""
    body = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0}
    texts, workers = [], []
    for flags in ((), ("-tp", "2")):
        server = ServerProcess(checkpoints["qwen2-moe"], "--served-model-name", "m", *flags)
        try:
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            texts.append(response.json()["choices"][0]["text"])
            workers = worker_pids(server.proc.pid)
            assert len(workers) == (1 if flags else 0)
        finally:
            assert server.stop() == 0
    assert texts[0] == texts[1]
    time.sleep(1)
    assert not any(alive(pid) for pid in workers)


def test_the_default_gguf_split_three_ways_equals_one_rank():
    """The bundled SmolLM2 (9 heads, 3 key/value heads, Q4_1 blocks): dequantized at load, as its blocks run along
    the input features that ranks split, then 3 ranks in float32 give one rank's tokens."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2)
    outputs = []
    for tp in (1, 3):
        llm = LLM(dtype="float32", max_model_len=128, num_kv_blocks=32, dequantize_gguf=tp == 1,
                  tensor_parallel_size=tp)
        try:
            assert llm.config.quantization is None
            outputs.append(llm.generate(prompts, params, use_tqdm=False))
        finally:
            llm.engine.shutdown()
    assert_same(*outputs)
    assert "Paris" in outputs[1][0].outputs[0].text
