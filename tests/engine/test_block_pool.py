import pytest

from pagedserve.engine.block_pool import BlockPool


def test_allocate_and_free_returns_everything():
    pool = BlockPool(8)
    blocks = pool.allocate(5)
    assert pool.num_free_blocks == 3
    assert all(b.ref_cnt == 1 for b in blocks)
    pool.free(blocks)
    assert pool.num_free_blocks == 8


def test_over_allocation_raises():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError):
        pool.allocate(3)


def test_zero_blocks_is_an_error():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_freed_cached_block_is_hit_until_evicted_lru():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, b"A")
    pool.cache(b, b"B")
    pool.free([b, a])  # tail first: b is evicted before a
    pool.free([c])
    assert pool.lookup(b"A") is a and pool.lookup(b"B") is b
    (first,) = pool.allocate(1)
    assert first is b and pool.lookup(b"B") is None and pool.lookup(b"A") is a


def test_touch_takes_a_hit_out_of_the_free_queue():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, b"A")
    pool.free([a, b])
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 1
    (other,) = pool.allocate(1)
    assert other is b  # the in-use cached block is never handed out
    pool.free([a, other])
    assert pool.num_free_blocks == 2


def test_first_block_keeps_a_hash():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, b"X")
    pool.cache(b, b"X")
    assert pool.lookup(b"X") is a and b.block_hash is None


def test_double_free_is_caught():
    pool = BlockPool(1)
    (a,) = pool.allocate(1)
    pool.free([a])
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([a])
    assert a.ref_cnt == 0 and pool.num_free_blocks == 1  # the pool is left as it was


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.cache(a, b"A")
    assert not pool.reset_prefix_cache()
    pool.free([a])
    assert pool.reset_prefix_cache()
    assert pool.lookup(b"A") is None
