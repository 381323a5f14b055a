"""The KV cache manager and scheduler without a model: prefix hits, salts, LRU, preemption, fork and copy-on-write."""

from engine_utils import pretend_step

from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams

BS = 16


def make_request(request_id: str, token_ids: list[int], max_tokens: int = 8, cache_salt: str | None = None) -> Request:
    return Request(request_id, list(token_ids), SamplingParams(max_tokens=max_tokens), None, 10_000,
                   cache_salt=cache_salt)


def compute_and_free(kv: KVCacheManager, request: Request) -> None:
    """As if the request's whole prompt ran: its full blocks are cached, then it finishes."""
    assert kv.allocate_slots(request, request.num_tokens)
    kv.forget(request)


def num_hit_tokens(kv: KVCacheManager, request: Request) -> int:
    return kv.get_computed_blocks(request)[1]


def tokens(n: int, start: int = 1) -> list[int]:
    return list(range(start, start + n))


def test_the_last_token_is_always_computed():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    compute_and_free(kv, make_request("a", tokens(33)))
    assert num_hit_tokens(kv, make_request("b", tokens(33))) == 32
    assert num_hit_tokens(kv, make_request("c", tokens(32))) == 16  # block 2 would leave nothing to compute
    assert num_hit_tokens(kv, make_request("d", tokens(16))) == 0
    assert num_hit_tokens(kv, make_request("e", tokens(40))) == 32


def test_hits_are_exactly_the_shared_full_blocks():
    kv = KVCacheManager(32, BS, enable_prefix_caching=True)
    compute_and_free(kv, make_request("base", tokens(100)))
    for shared in (0, 1, 15, 16, 17, 31, 32, 33, 64, 90):
        request = make_request(f"r{shared}", tokens(shared) + tokens(20, start=1000))
        assert num_hit_tokens(kv, request) == shared // BS * BS, shared


def test_a_different_first_block_misses_everything_after_it():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    compute_and_free(kv, make_request("a", tokens(64)))
    changed_first = make_request("b", [999] + tokens(63, start=2))
    assert num_hit_tokens(kv, changed_first) == 0  # blocks 1.. have the same tokens but another parent


def test_cache_salt_separates_prefixes():
    kv = KVCacheManager(32, BS, enable_prefix_caching=True)
    compute_and_free(kv, make_request("a", tokens(40), cache_salt="alice"))
    assert num_hit_tokens(kv, make_request("b", tokens(40), cache_salt="alice")) == 32
    assert num_hit_tokens(kv, make_request("c", tokens(40), cache_salt="bob")) == 0
    assert num_hit_tokens(kv, make_request("d", tokens(40))) == 0
    compute_and_free(kv, make_request("e", tokens(40)))
    assert num_hit_tokens(kv, make_request("f", tokens(40), cache_salt="bob")) == 0
    assert num_hit_tokens(kv, make_request("g", tokens(40))) == 32
    assert kv.pool.num_free_blocks == 32


def test_lru_eviction_takes_the_least_recently_freed_chain_end_first():
    kv = KVCacheManager(6, BS, enable_prefix_caching=True)
    compute_and_free(kv, make_request("a", tokens(33)))  # 3 blocks, 2 cached; freed tail first
    compute_and_free(kv, make_request("b", tokens(33, start=500)))  # free queue: a2 a1 a0 b2 b1 b0

    def hits() -> tuple[int, int]:
        a, b = make_request("a?", tokens(33)), make_request("b?", tokens(33, start=500))
        return num_hit_tokens(kv, a), num_hit_tokens(kv, b)

    holders = [make_request(f"h{i}", tokens(1, start=1000 + i)) for i in range(5)]
    assert kv.allocate_slots(holders[0], 1)  # takes a's partial block
    assert hits() == (32, 32)
    assert kv.allocate_slots(holders[1], 1)  # evicts a's chain end, not its root
    assert hits() == (16, 32)

    reuse = make_request("reuse", tokens(17))
    blocks, num_hits = kv.get_computed_blocks(reuse)
    assert num_hits == 16 and kv.allocate_slots(reuse, 1, blocks)
    kv.forget(reuse)  # a0 was just used: now the most recently freed
    assert all(kv.allocate_slots(holder, 1) for holder in holders[2:])
    assert hits() == (16, 0)  # all of b's blocks went before the refreshed a0
    for holder in holders:
        kv.forget(holder)
    assert kv.pool.num_free_blocks == 6


def test_a_hit_refreshes_lru_and_an_in_use_cached_block_is_never_evicted():
    kv = KVCacheManager(4, BS, enable_prefix_caching=True)
    compute_and_free(kv, make_request("a", tokens(17)))  # a0 cached, a1 partial
    compute_and_free(kv, make_request("b", tokens(17, start=500)))  # b0 cached, b1 partial
    holder = make_request("holder", tokens(17))
    hits, num_hits = kv.get_computed_blocks(holder)
    assert num_hits == 16 and kv.allocate_slots(holder, 1, hits)  # holds a0 again, plus a new block
    other = make_request("other", tokens(32, start=4000))
    assert kv.allocate_slots(other, 32)  # the 2 remaining free blocks: b's, never the in-use a0
    assert kv.pool.num_free_blocks == 0
    assert not kv.allocate_slots(make_request("more", tokens(1, start=7000)), 1)
    assert num_hit_tokens(kv, make_request("a2", tokens(17))) == 16
    assert num_hit_tokens(kv, make_request("b2", tokens(17, start=500))) == 0
    kv.forget(holder)
    kv.forget(other)
    assert kv.pool.num_free_blocks == 4


def test_a_preempted_request_gets_its_blocks_back_as_hits():
    kv = KVCacheManager(7, BS, enable_prefix_caching=True)
    sched = Scheduler(kv, 256, 8)
    a = make_request("a", tokens(40), max_tokens=12)  # both need a 4th block at 48 tokens: 8 > 7
    b = make_request("b", tokens(40, start=500), max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    num_tokens_at_preemption = None
    for _ in range(200):
        pretend_step(sched)
        if b.status == RequestStatus.PREEMPTED and num_tokens_at_preemption is None:
            num_tokens_at_preemption = b.num_tokens
            queries_before = kv.prefix_cache_queries
        if num_tokens_at_preemption is not None and b.status == RequestStatus.RUNNING:
            break
    assert num_tokens_at_preemption is not None and b.status == RequestStatus.RUNNING
    # b's full blocks kept their hashes when freed, and a finished before it needed them.
    assert b.num_cached_tokens == (num_tokens_at_preemption - 1) // BS * BS > 0
    assert kv.prefix_cache_queries == queries_before + num_tokens_at_preemption  # the resumed lookup counts
    while sched.has_unfinished():
        pretend_step(sched)
    assert kv.pool.num_free_blocks == 7


def test_a_lookup_is_counted_once_per_admission_not_per_retry():
    kv = KVCacheManager(4, BS, enable_prefix_caching=True)
    sched = Scheduler(kv, 256, 8)
    big = make_request("big", tokens(40), max_tokens=20)
    sched.add_request(big)
    pretend_step(sched)
    waiter = make_request("waiter", tokens(40, start=500), max_tokens=2)
    sched.add_request(waiter)
    for _ in range(5):  # waiter needs 3 blocks, 1 is free: it waits
        pretend_step(sched)
        assert waiter.status == RequestStatus.WAITING
    assert kv.prefix_cache_queries == 40
    while sched.has_unfinished():
        pretend_step(sched)
    assert kv.prefix_cache_queries == 80 and kv.pool.num_free_blocks == 4


def test_fork_shares_blocks_and_copies_a_shared_partial_block_on_write():
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    parent = make_request("p", tokens(10))
    assert kv.allocate_slots(parent, 10)
    parent.num_computed_tokens = 10
    children = [make_request(f"c{i}", tokens(10)) for i in range(2)]
    for child in children:
        kv.fork(parent, child)
        child.num_computed_tokens = 9  # each computes the last prompt token itself
    shared = list(kv.req_blocks["p"])
    assert [b.ref_cnt for b in shared] == [3, 3, 3] and kv.pool.num_free_blocks == 13
    assert kv.take_block_copies() == []

    assert kv.allocate_slots(children[0], 1)  # writes into the shared partial block: copy it
    assert kv.allocate_slots(parent, 1)  # so does the parent, writing its first output token
    assert kv.allocate_slots(children[1], 1)  # the last holder writes in place
    copies = kv.take_block_copies()
    last = shared[2].block_id
    assert [src for src, _ in copies] == [last, last]
    assert {dst for _, dst in copies} == {kv.req_blocks["c0"][2].block_id, kv.req_blocks["p"][2].block_id}
    assert kv.req_blocks["c1"][2].block_id == last and shared[2].ref_cnt == 1
    assert [b.ref_cnt for b in kv.req_blocks["p"][:2]] == [3, 3]
    assert kv.pool.num_free_blocks == 11  # 5 blocks for three 10-token sequences, not 9
    for request in (parent, *children):
        kv.forget(request)
    assert kv.pool.num_free_blocks == 16 and all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_fork_at_a_block_boundary_copies_only_for_the_rewriting_samples():
    kv = KVCacheManager(8, 4, enable_prefix_caching=False)
    parent = make_request("p", tokens(8))
    assert kv.allocate_slots(parent, 8)
    parent.num_computed_tokens = 8
    child = make_request("c", tokens(8))
    kv.fork(parent, child)
    child.num_computed_tokens = 7
    assert kv.allocate_slots(parent, 1)  # its next token starts a block of its own
    assert kv.take_block_copies() == []
    assert kv.allocate_slots(child, 1)  # rewrites the last prompt token in the shared full block
    (copy,) = kv.take_block_copies()
    assert copy[0] == kv.req_blocks["p"][1].block_id and copy[1] == kv.req_blocks["c"][1].block_id
    kv.forget(parent)
    kv.forget(child)
    assert kv.pool.num_free_blocks == 8


def test_copy_on_write_without_a_free_block_changes_nothing():
    kv = KVCacheManager(3, 4, enable_prefix_caching=False)
    parent = make_request("p", tokens(10))
    assert kv.allocate_slots(parent, 10)
    parent.num_computed_tokens = 10
    child = make_request("c", tokens(10))
    kv.fork(parent, child)
    child.num_computed_tokens = 9
    assert not kv.allocate_slots(child, 1)
    assert kv.take_block_copies() == [] and [b.ref_cnt for b in kv.req_blocks["c"]] == [2, 2, 2]
    kv.forget(child)
    assert kv.allocate_slots(parent, 1)  # the only holder now: in place
    assert kv.take_block_copies() == []
    kv.forget(parent)
    assert kv.pool.num_free_blocks == 3


def test_uncache_forgets_hashes_of_blocks_a_failed_step_was_to_fill():
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    request = make_request("a", tokens(40))
    assert kv.allocate_slots(request, 40)
    kv.uncache(request)
    kv.forget(request)
    assert num_hit_tokens(kv, make_request("b", tokens(40))) == 0
