"""Per-request block tables over the block pool: allocate, grow, free, and prefix-cache hits."""

import hashlib
import pickle

from pagedserve.core.block_pool import BlockPool, KVBlock
from pagedserve.core.request import Request


def hash_block(parent_hash: bytes | None, token_ids: list[int], extra_keys: tuple = ()) -> bytes:
    """A block's identity: chained from its parent's, so equal hashes mean equal whole prefixes.

    sha256 over the pickled tuple: a collision would silently serve another prefix's K/V.
    """
    return hashlib.sha256(pickle.dumps((parent_hash, tuple(token_ids), extra_keys))).digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_block_hashes: dict[str, list[bytes]] = {}
        self.req_num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_blocks.get(request_id, ())]

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the request's full blocks, computed once per block as it fills."""
        hashes = self.req_block_hashes.setdefault(request.request_id, [])
        num_full = request.num_tokens // self.block_size
        if len(hashes) < num_full:
            token_ids = request.all_token_ids
            bs = self.block_size
            for i in range(len(hashes), num_full):
                parent = hashes[-1] if hashes else None
                extra = (request.cache_salt,) if i == 0 and request.cache_salt else ()
                hashes.append(hash_block(parent, token_ids[i * bs : (i + 1) * bs], extra))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest run of cached full blocks of the request's tokens, and how many tokens that is.

        At least one token is always left to compute, so the step has logits to sample from.
        """
        if not self.enable_prefix_caching:
            return [], 0
        hashes = self.block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVBlock] | None = None
    ) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones; False if the pool is short."""
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = self.num_blocks_needed(total) - len(blocks) - len(new_computed_blocks)
        num_free_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if max(num_needed, 0) + num_free_hits > self.pool.num_free_blocks:
            return False
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        if num_needed > 0:
            blocks.extend(self.pool.allocate(num_needed))
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, blocks, total)
        return True

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.free(list(reversed(blocks)))
        self.req_num_cached_blocks.pop(request.request_id, None)

    def forget(self, request: Request) -> None:
        """Drop everything kept for a finished request (its hashes too)."""
        self.free(request)
        self.req_block_hashes.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        num_full = num_tokens // self.block_size
        start = self.req_num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self.block_hashes(request)
        for i in range(start, num_full):
            self.pool.cache(blocks[i], hashes[i])
        self.req_num_cached_blocks[request.request_id] = num_full
