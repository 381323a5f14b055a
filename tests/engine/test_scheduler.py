"""The scheduler alone, with no model: budgets, chunking, preemption, admission, and no leaks."""

from engine_utils import pretend_step, receive_token

from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams


def make_request(i: int, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), None, 10_000)


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, caching=False):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(kv, budget, max_seqs), kv


def test_budget_and_chunked_prefill():
    sched, _ = make_scheduler(budget=10)
    sched.add_request(make_request(0, 25))
    assert pretend_step(sched) == {"r0": 10}
    assert pretend_step(sched) == {"r0": 10}
    assert pretend_step(sched) == {"r0": 5}  # reaches the end: samples
    assert pretend_step(sched) == {"r0": 1}  # decode


def test_decodes_and_prefill_share_a_step():
    sched, _ = make_scheduler(budget=16)
    sched.add_request(make_request(0, 4))
    pretend_step(sched)
    sched.add_request(make_request(1, 40))
    assert pretend_step(sched) == {"r0": 1, "r1": 15}


def test_max_num_seqs():
    sched, _ = make_scheduler(max_seqs=2, budget=100)
    for i in range(3):
        sched.add_request(make_request(i, 3))
    assert set(pretend_step(sched)) == {"r0", "r1"}
    assert len(sched.waiting) == 1


def test_preemption_when_blocks_run_out_and_no_leaks():
    sched, kv = make_scheduler(num_blocks=6, block_size=4, budget=64)
    for i in range(3):
        sched.add_request(make_request(i, 7, max_tokens=10))  # each grows to 17 tokens = 5 blocks
    steps = 0
    while sched.has_unfinished():
        pretend_step(sched)
        steps += 1
        assert steps < 200, "scheduler made no progress"
    assert sched.num_preemptions > 0
    assert kv.num_free_blocks == 6


def test_preempted_request_recomputes_from_scratch():
    sched, kv = make_scheduler(num_blocks=4, block_size=4, budget=64)
    a, b = make_request(0, 7, max_tokens=8), make_request(1, 7, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    pretend_step(sched)  # both admitted: 7 prompt tokens + 1 sampled, 2 blocks each
    pretend_step(sched)  # the 8th token still fits
    assert b.status == RequestStatus.RUNNING
    pretend_step(sched)  # both need a third block: b (newest) is preempted
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert sched.waiting[0] is b
    assert a.status == RequestStatus.RUNNING


def test_output_is_per_step_diffs_of_plain_data():
    """A request comes whole the first time, then only with what changed; finished and preempted ones are
    named so the runner forgets them; a preempted one comes whole again, with the tokens it had made."""
    sched, kv = make_scheduler(num_blocks=4, block_size=4, budget=64)
    a, b = make_request(0, 7, max_tokens=8), make_request(1, 7, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert [(n.req_id, n.block_ids, n.num_computed_tokens) for n in out.new_requests] == [
        ("r0", kv.get_block_ids("r0"), 0), ("r1", kv.get_block_ids("r1"), 0)]
    assert out.num_scheduled_tokens == {"r0": 7, "r1": 7} and not out.cached_requests
    for request in (a, b):  # the scheduler counted the step's tokens as computed; the sampled one arrives
        assert request.num_computed_tokens == 7
        receive_token(request, 9)
    out = sched.schedule()  # the 8th token still fits in 2 blocks: nothing changes in the tables
    assert not out.new_requests
    assert [(c.req_id, c.num_computed_tokens, c.new_block_ids) for c in out.cached_requests] == [
        ("r0", 7, []), ("r1", 7, [])]
    for request in (a, b):  # the scheduler counted the step's tokens as computed; the sampled one arrives
        assert request.num_computed_tokens == 8
        receive_token(request, 9)
    out = sched.schedule()  # both need a third block: b is preempted, a gets one more
    assert out.preempted_req_ids == {"r1"} and list(out.num_scheduled_tokens) == ["r0"]
    (cached,) = out.cached_requests
    assert cached.block_table_start == 2 and cached.new_block_ids == kv.get_block_ids("r0")[2:]
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    out = sched.schedule()
    assert out.finished_req_ids == {"r0"}
    (resumed,) = out.new_requests
    assert resumed.req_id == "r1" and resumed.output_token_ids == [9, 9] and resumed.num_computed_tokens == 0
    assert out.num_scheduled_tokens == {"r1": 9}


def test_abort_frees_blocks():
    sched, kv = make_scheduler()
    r = make_request(0, 10)
    sched.add_request(r)
    pretend_step(sched)
    assert kv.num_free_blocks < 64
    sched.finish(r, RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == 64 and not sched.has_unfinished()


def test_prefix_hits_skip_computed_blocks():
    sched, kv = make_scheduler(caching=True, budget=100)
    first = make_request(0, 10)
    sched.add_request(first)
    pretend_step(sched)
    sched.finish(first, RequestStatus.FINISHED_STOPPED)
    second = make_request(1, 10)
    sched.add_request(second)
    # 10 tokens = 2 full blocks of 4 cached; at least one token is always computed
    assert pretend_step(sched) == {"r1": 2}
    assert kv.prefix_cache_hits == 8
    exact_block_multiple = make_request(2, 8)
    sched.add_request(exact_block_multiple)
    assert pretend_step(sched)["r2"] == 4  # 8 tokens: only the first block may hit
