"""Fixed-size KV blocks: a free queue, reference counts, and hash -> block for the prefix cache.

The free queue is an OrderedDict used as a doubly-linked list: allocation pops the head (least recently
freed), a prefix-cache hit pulls a block out of the middle in O(1), and freed blocks go to the tail.
A freed block keeps its hash, so it can still be hit until it is reused (LRU eviction).
"""

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full (prefix caching on)


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached_blocks: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        """Take `n` blocks from the head of the free queue, evicting their cached hashes."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} KV blocks, only {len(self.free_queue)} free")
        blocks = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-cache hits; a hit on a free block takes it out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Register a full block under its hash (the first block with a given hash keeps it)."""
        if block.block_hash is None and block_hash not in self.cached_blocks:
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference each; pass blocks tail first so chain ends are evicted before roots."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"KV block {block.block_id} freed twice")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = None

    def uncache(self, blocks: list[KVBlock]) -> None:
        """Forget the hashes of blocks whose K/V may not have been written (a failed step)."""
        for block in blocks:
            self._evict(block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        return True

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached_blocks.get(block.block_hash) is block:
                del self.cached_blocks[block.block_hash]
            block.block_hash = None
