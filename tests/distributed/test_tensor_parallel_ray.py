"""tensor_parallel_size=2 with its worker as a Ray actor (`distributed_executor_backend="ray"`), on a local Ray of
2 CPUs: the same tokens as one rank; a killed actor fails the engine (within the collective timeout). Skipped only
if Ray cannot start."""

from datetime import timedelta

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.distributed import parallel_state
from pagedserve.executor.base import WorkerFailed

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'pagedserve[ray]')")

TINY = dict(dtype="float32", max_model_len=256, num_kv_blocks=64)
PROMPTS = [{"prompt_token_ids": [5 + i, 17, 33 + i, 100, 7] * (1 + 2 * i)} for i in range(6)]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    except Exception as e:  # noqa: BLE001 - whatever stops Ray here is the reason to skip
        pytest.skip(f"a local Ray cannot start here: {e}")
    yield
    ray.shutdown()


def test_ray_workers_equal_one_rank(checkpoints):
    """Mixtral: its experts split across the engine process and the actor."""
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2)
    one = LLM(checkpoints["mixtral"], **TINY)
    expected = one.generate(PROMPTS, params, use_tqdm=False)
    one.engine.shutdown()
    two = LLM(checkpoints["mixtral"], **TINY, tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        actual = two.generate(PROMPTS, params, use_tqdm=False)
    finally:
        two.engine.shutdown()
    for want, got in zip(expected, actual, strict=True):
        assert want.outputs[0].token_ids == got.outputs[0].token_ids
        for a, b in zip(want.outputs[0].logprobs, got.outputs[0].logprobs):
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def test_a_killed_actor_fails_the_engine(checkpoints, monkeypatch):
    # rank 0 waits for the dead rank in the step's first collective until COLLECTIVE_TIMEOUT (120 s), then the
    # executor finds the actor gone: a shorter timeout (still room for the actor to start) keeps the test short
    monkeypatch.setattr(parallel_state, "COLLECTIVE_TIMEOUT", timedelta(seconds=30))
    llm = LLM(checkpoints["llama"], **TINY, tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        ray.kill(llm.engine.model_runner.workers[0].actor)
        with pytest.raises(WorkerFailed, match="worker 1"):
            llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4), use_tqdm=False)
    finally:
        llm.engine.shutdown()
