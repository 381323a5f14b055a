"""EngineCore directly: fault isolation, aborts and accounting."""

import pytest

from pagedserve.config import EngineArgs, create_engine_config
from pagedserve.engine.engine_core import EngineCore
from pagedserve.engine.protocol import AddRequest
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
    return stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_a_failing_step_fails_only_its_requests(engine, monkeypatch):
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
    engine.add_request(AddRequest("a", [5, 6, 7], params))
    engine.add_request(AddRequest("b", [8, 9], params))
    real_execute = engine.model_runner.execute

    def broken(sched, req_ids):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine.model_runner, "execute", broken)
    outs = engine.step()
    assert {o.request_id for o in outs} == {"a", "b"}
    assert all(o.finish_reason == "error" and "kernel exploded" in o.error for o in outs)
    assert all_blocks_free(engine) and not engine.has_unfinished_requests()

    monkeypatch.setattr(engine.model_runner, "execute", real_execute)
    engine.add_request(AddRequest("c", [5, 6, 7], params))
    outputs = run_all(engine)
    assert sum(len(o.new_token_ids) for o in outputs["c"]) == 4 and outputs["c"][-1].finish_reason == "length"


POISON = 13  # a token id whose presence in a step breaks the (patched) model


def test_the_request_that_breaks_a_step_fails_alone(engine, monkeypatch):
    """The step is retried without the culprit (halving the batch): its neighbours get exactly the tokens they
    get without it, in the same steps."""
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0)
    prompts = {f"r{i}": [5 + i, 6, 7 + i, 8] for i in range(5)}
    for request_id, prompt in prompts.items():
        engine.add_request(AddRequest(request_id, prompt, params))
    expected = {k: sum((o.new_token_ids for o in v), []) for k, v in run_all(engine).items()}

    model = engine.model_runner.model
    real_forward = model.forward

    def forward(input_ids, positions, meta):
        if (input_ids == POISON).any():
            raise RuntimeError("poisoned batch")
        return real_forward(input_ids, positions, meta)

    monkeypatch.setattr(model, "forward", forward)
    for request_id, prompt in prompts.items():
        engine.add_request(AddRequest(request_id, prompt, params))
        if request_id == "r2":
            engine.add_request(AddRequest("bad", [5, POISON, 7], params))
    outputs = run_all(engine)
    assert outputs["bad"][-1].finish_reason == "error" and "poisoned batch" in outputs["bad"][-1].error
    assert {k: sum((o.new_token_ids for o in v), []) for k, v in outputs.items() if k != "bad"} == expected
    assert all(v[-1].finish_reason == "length" for k, v in outputs.items() if k != "bad")
    assert all_blocks_free(engine)


def test_abort_mid_generation_frees_blocks(engine):
    engine.add_request(AddRequest("a", list(range(5, 60)), SamplingParams(max_tokens=50, ignore_eos=True)))
    engine.step()
    assert not all_blocks_free(engine)
    engine.abort_requests(["a", "never-existed"])
    assert all_blocks_free(engine) and not engine.has_unfinished_requests()


def test_duplicate_request_id_is_rejected(engine):
    engine.add_request(AddRequest("a", [5], SamplingParams()))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(AddRequest("a", [6], SamplingParams()))


def test_prompt_larger_than_the_pool_is_rejected(llama_dir):
    engine = EngineCore(create_engine_config(EngineArgs(llama_dir, dtype="float32", max_model_len=512,
                                                        num_kv_blocks=4)))
    with pytest.raises(ValueError, match="KV cache holds 64"):
        engine.add_request(AddRequest("big", list(range(5, 105)), SamplingParams(max_tokens=4)))
    assert not engine.has_unfinished_requests() and all_blocks_free(engine)


def test_generation_stops_at_pool_capacity(llama_dir):
    """With a pool smaller than max_model_len, a lone request grows to the pool's size and stops there."""
    engine = EngineCore(create_engine_config(EngineArgs(llama_dir, dtype="float32", max_model_len=512,
                                                        num_kv_blocks=4, block_size=16)))
    engine.add_request(AddRequest("a", [5, 6, 7], SamplingParams(max_tokens=None, ignore_eos=True)))
    outputs = run_all(engine)
    assert sum(len(o.new_token_ids) for o in outputs["a"]) == 64 - 3
    assert outputs["a"][-1].finish_reason == "length" and all_blocks_free(engine)
