"""The scheduler alone, with no model: budgets, chunking, preemption, admission, and no leaks."""

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams


def make_request(i: int, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), None, 10_000)


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, caching=False):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(kv, budget, max_seqs), kv


def run_step(sched: Scheduler) -> dict[str, int]:
    """Pretend the model ran: advance computed tokens; append a token where the chunk reached the end."""
    out = sched.schedule()
    scheduled = {s.request.request_id: s.num_new_tokens for s in out.scheduled}
    for s in out.scheduled:
        samples = s.samples
        s.request.num_computed_tokens += s.num_new_tokens
        if samples:
            s.request.output_token_ids.append(7)
            if s.request.num_output_tokens >= s.request.max_output_tokens:
                sched.finish(s.request, RequestStatus.FINISHED_LENGTH)
    return scheduled


def test_budget_and_chunked_prefill():
    sched, _ = make_scheduler(budget=10)
    sched.add_request(make_request(0, 25))
    assert run_step(sched) == {"r0": 10}
    assert run_step(sched) == {"r0": 10}
    assert run_step(sched) == {"r0": 5}  # reaches the end: samples
    assert run_step(sched) == {"r0": 1}  # decode


def test_decodes_and_prefill_share_a_step():
    sched, _ = make_scheduler(budget=16)
    sched.add_request(make_request(0, 4))
    run_step(sched)
    sched.add_request(make_request(1, 40))
    assert run_step(sched) == {"r0": 1, "r1": 15}


def test_max_num_seqs():
    sched, _ = make_scheduler(max_seqs=2, budget=100)
    for i in range(3):
        sched.add_request(make_request(i, 3))
    assert set(run_step(sched)) == {"r0", "r1"}
    assert len(sched.waiting) == 1


def test_preemption_when_blocks_run_out_and_no_leaks():
    sched, kv = make_scheduler(num_blocks=6, block_size=4, budget=64)
    for i in range(3):
        sched.add_request(make_request(i, 7, max_tokens=10))  # each grows to 17 tokens = 5 blocks
    steps = 0
    while sched.has_unfinished():
        run_step(sched)
        steps += 1
        assert steps < 200, "scheduler made no progress"
    assert sched.num_preemptions > 0
    assert kv.num_free_blocks == 6


def test_preempted_request_recomputes_from_scratch():
    sched, kv = make_scheduler(num_blocks=4, block_size=4, budget=64)
    a, b = make_request(0, 7, max_tokens=8), make_request(1, 7, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)  # both admitted: 7 prompt tokens + 1 sampled, 2 blocks each
    run_step(sched)  # the 8th token still fits
    assert b.status == RequestStatus.RUNNING
    run_step(sched)  # both need a third block: b (newest) is preempted
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert sched.waiting[0] is b
    assert a.status == RequestStatus.RUNNING


def test_request_that_can_never_fit_finishes_with_error():
    sched, kv = make_scheduler(num_blocks=2, block_size=4)
    sched.add_request(make_request(0, 20))
    sched.add_request(make_request(1, 3))
    out = sched.schedule()
    assert [r.request_id for r in out.finished] == ["r0"]
    assert out.finished[0].status == RequestStatus.FINISHED_ERROR and "KV cache" in out.finished[0].error
    assert [s.request.request_id for s in out.scheduled] == ["r1"]


def test_abort_frees_blocks():
    sched, kv = make_scheduler()
    r = make_request(0, 10)
    sched.add_request(r)
    run_step(sched)
    assert kv.num_free_blocks < 64
    sched.finish(r, RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == 64 and not sched.has_unfinished()


def test_prefix_hits_skip_computed_blocks():
    sched, kv = make_scheduler(caching=True, budget=100)
    first = make_request(0, 10)
    sched.add_request(first)
    run_step(sched)
    sched.finish(first, RequestStatus.FINISHED_STOPPED)
    second = make_request(1, 10)
    sched.add_request(second)
    # 10 tokens = 2 full blocks of 4 cached; at least one token is always computed
    assert run_step(sched) == {"r1": 2}
    assert kv.prefix_cache_hits == 8
    exact_block_multiple = make_request(2, 8)
    sched.add_request(exact_block_multiple)
    assert run_step(sched)["r2"] == 4  # 8 tokens: only the first block may hit
