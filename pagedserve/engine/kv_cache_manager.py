"""Per-request block tables over the block pool: allocate, grow, fork, copy-on-write, free, prefix-cache hits."""

import hashlib
import pickle

from pagedserve.engine.block_pool import BlockPool, KVBlock
from pagedserve.engine.request import Request
from pagedserve.engine.sessions import Sessions, session_key


def hash_block(parent_hash: bytes | None, token_ids: list[int], extra_keys: tuple = ()) -> bytes:
    """A block's identity: chained from its parent's, so equal hashes mean equal whole prefixes.

    sha256 over the pickled tuple: a collision would silently serve another prefix's K/V.
    """
    return hashlib.sha256(pickle.dumps((parent_hash, tuple(token_ids), extra_keys))).digest()


def block_extra_keys(request: Request, block_index: int) -> tuple:
    """What besides its token ids decides a block's K/V: the cache salt and the request's K/V variant
    (e.g. LongRoPE's long factors), on the first block (the chain carries them to the rest). A LoRA id or
    the hashes of images overlapping the block would go here too."""
    if block_index != 0:
        return ()
    return ((request.cache_salt,) if request.cache_salt else ()) + request.kv_variant


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        # Agent sessions; their leases keep a finished turn's blocks for the session's next turn.
        self.sessions = Sessions(self.pool, block_size)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_block_hashes: dict[str, list[bytes]] = {}
        self.req_num_cached_blocks: dict[str, int] = {}
        # Copy-on-write copies (src block id, dst block id) decided since the last take_block_copies().
        self.block_copies: list[tuple[int, int]] = []
        # request id -> first index of its block table changed since the last take_table_change().
        self.table_changed_from: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up, once per admission
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
                hashes.append(hash_block(parent, token_ids[i * bs : (i + 1) * bs], block_extra_keys(request, i)))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest run of cached full blocks of the request's tokens, and how many tokens that is.

        At least one token is always left to compute, so the step has logits to sample from. A request that still
        needs prompt logprobs finds nothing: the logits of its prompt positions must be computed (as vLLM).
        """
        if not self.enable_prefix_caching or request.needs_prompt_logprobs:
            return [], 0
        hashes = self.block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count an admission's lookup (a resumed preempted request looks up again), not retries that wait."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit_tokens

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVBlock] | None = None
    ) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones; False if the pool is short.

        The first block written to, if shared with another sample (ref count > 1), is replaced by a copy.
        """
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = max(self.num_blocks_needed(total) - len(blocks) - len(new_computed_blocks), 0)
        write_index = num_computed // self.block_size
        copy_on_write = write_index < len(blocks) and blocks[write_index].ref_cnt > 1
        num_free_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        shortfall = num_needed + copy_on_write + num_free_hits - self.pool.num_free_blocks
        if shortfall > 0 and self.sessions.num_reclaimable(new_computed_blocks) < shortfall:
            return False
        changed_from = write_index if copy_on_write else len(blocks)
        self.pool.touch(new_computed_blocks)  # first: the hits now hold references that no lease eviction frees
        if shortfall > 0:  # leases give way before anyone is preempted
            self.sessions.reclaim(num_needed + copy_on_write)
        blocks.extend(new_computed_blocks)
        if copy_on_write:
            (copy,) = self.pool.allocate(1)
            self.block_copies.append((blocks[write_index].block_id, copy.block_id))
            self.pool.free([blocks[write_index]])  # the other samples keep it
            blocks[write_index] = copy
        if num_needed:
            blocks.extend(self.pool.allocate(num_needed))
        if changed_from < len(blocks):
            previous = self.table_changed_from.get(request.request_id, changed_from)
            self.table_changed_from[request.request_id] = min(previous, changed_from)
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, blocks, total)
        return True

    def fork(self, parent: Request, child: Request) -> None:
        """Give `child` the parent's block table, shared by reference count (and what is known of its hashes)."""
        blocks = self.req_blocks[parent.request_id]
        self.pool.touch(blocks)
        self.req_blocks[child.request_id] = list(blocks)
        if self.enable_prefix_caching:
            self.req_block_hashes[child.request_id] = list(self.block_hashes(parent))
            self.req_num_cached_blocks[child.request_id] = self.req_num_cached_blocks.get(parent.request_id, 0)

    def take_table_change(self, request_id: str) -> int | None:
        """The first index of the request's block table changed since the last call (None: unchanged)."""
        return self.table_changed_from.pop(request_id, None)

    def take_block_copies(self) -> list[tuple[int, int]]:
        copies, self.block_copies = self.block_copies, []
        return copies

    def trim(self, request: Request) -> None:
        """Free the blocks past the request's computed tokens: slots a rejected draft was given. They were never
        hashed (a block is hashed once its tokens are known), so they go back to the pool as free."""
        blocks = self.req_blocks.get(request.request_id, [])
        keep = self.num_blocks_needed(request.num_computed_tokens)
        if len(blocks) > keep:
            self.pool.free(list(reversed(blocks[keep:])))
            del blocks[keep:]

    def free(self, request: Request) -> None:
        """Drop the request's blocks (e.g. preempted); it keeps its hashes, to find them again as hits."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.free(list(reversed(blocks)))
        self.req_num_cached_blocks.pop(request.request_id, None)
        self.table_changed_from.pop(request.request_id, None)

    def forget(self, request: Request) -> None:
        """Drop everything kept for a finished request (its hashes too)."""
        self.free(request)
        self.req_block_hashes.pop(request.request_id, None)

    def retain(self, request: Request) -> None:
        """A session's request finished well: its full, hashed blocks go to the session's lease (its TTL from
        `request.kv_retention_s`, or guessed); the rest are freed as by `forget`. Only hashed blocks can be
        found again, so without prefix caching nothing is kept."""
        assert request.session_id is not None
        if not self.enable_prefix_caching:
            self.forget(request)
            return
        blocks = self.req_blocks.get(request.request_id, [])
        num_leased = self.req_num_cached_blocks.get(request.request_id, 0)
        self.req_blocks[request.request_id] = blocks[num_leased:]  # the lease takes over these references
        self.sessions.lease(session_key(request.session_id, request.cache_salt), blocks[:num_leased],
                            request.kv_retention_s)
        self.forget(request)

    def uncache(self, request: Request) -> None:
        """Forget the hashes of the request's blocks: a failed step may have left their K/V unwritten."""
        self.pool.uncache(self.req_blocks.get(request.request_id, []))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        # Only blocks whose tokens are known: a step scheduled before the previous one's token is back (async
        # scheduling) fills a block whose last token is not; a later allocation hashes it.
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.req_num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self.block_hashes(request)
        for i in range(start, num_full):
            self.pool.cache(blocks[i], hashes[i])
        self.req_num_cached_blocks[request.request_id] = num_full
