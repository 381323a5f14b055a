"""EngineCore directly: fault isolation, aborts and accounting."""

import pytest

from pagedserve.config import EngineArgs, create_engine_config
from pagedserve.core.engine_core import EngineCore
from pagedserve.sampling_params import SamplingParams


@pytest.fixture
def engine(llama_dir) -> EngineCore:
    return EngineCore(create_engine_config(EngineArgs(llama_dir, dtype="float32", max_model_len=128,
                                                      num_kv_blocks=32)))


def run_all(engine: EngineCore) -> dict[str, list]:
    outputs: dict[str, list] = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def all_blocks_free(engine: EngineCore) -> bool:
    stats = engine.stats()
    return stats["num_kv_blocks_free"] == stats["num_kv_blocks_total"]


def test_a_failing_step_fails_only_its_requests(engine, monkeypatch):
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
    engine.add_request("a", [5, 6, 7], params)
    engine.add_request("b", [8, 9], params)
    real_execute = engine.model_runner.execute

    def broken(scheduled):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine.model_runner, "execute", broken)
    outs = engine.step()
    assert {o.request_id for o in outs} == {"a", "b"}
    assert all(o.finish_reason == "error" and "kernel exploded" in o.error for o in outs)
    assert all_blocks_free(engine) and not engine.has_unfinished_requests()

    monkeypatch.setattr(engine.model_runner, "execute", real_execute)
    engine.add_request("c", [5, 6, 7], params)
    outputs = run_all(engine)
    assert sum(len(o.new_token_ids) for o in outputs["c"]) == 4 and outputs["c"][-1].finish_reason == "length"


def test_abort_mid_generation_frees_blocks(engine):
    engine.add_request("a", list(range(5, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert not all_blocks_free(engine)
    engine.abort_requests(["a", "never-existed"])
    assert all_blocks_free(engine) and not engine.has_unfinished_requests()


def test_duplicate_request_id_is_rejected(engine):
    engine.add_request("a", [5], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [6], SamplingParams())


def test_prompt_larger_than_the_pool_finishes_with_error(llama_dir):
    engine = EngineCore(create_engine_config(EngineArgs(llama_dir, dtype="float32", max_model_len=512,
                                                        num_kv_blocks=4)))
    engine.add_request("big", list(range(5, 105)), SamplingParams(max_tokens=4))
    engine.add_request("small", [5, 6], SamplingParams(max_tokens=4, ignore_eos=True))
    outputs = run_all(engine)
    assert outputs["big"][-1].finish_reason == "error" and "KV cache" in outputs["big"][-1].error
    assert outputs["small"][-1].finish_reason == "length"
    assert all_blocks_free(engine)


def test_generation_stops_at_pool_capacity(llama_dir):
    """With a pool smaller than max_model_len, a lone request grows to the pool's size and stops there."""
    engine = EngineCore(create_engine_config(EngineArgs(llama_dir, dtype="float32", max_model_len=512,
                                                        num_kv_blocks=4, block_size=16)))
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=None, ignore_eos=True))
    outputs = run_all(engine)
    assert sum(len(o.new_token_ids) for o in outputs["a"]) == 64 - 3
    assert outputs["a"][-1].finish_reason == "length" and all_blocks_free(engine)
