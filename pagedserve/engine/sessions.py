"""Agent sessions: a paused session's KV kept warm across its tool call, and the service each session got.

An agent turn ends in a tool call; seconds later the next turn arrives with the whole history. With plain LRU
prefix caching, other requests evict the paused session's blocks meanwhile and the next turn recomputes the
history. So when a request of a session finishes, its full, hashed blocks stay held by a *lease* (one
reference per block, owned by the session, never by a request that could leak it) until:
- the session's next request is admitted: its prefix-cache hits take their own references, then the lease
  is dropped (what it held beyond the hits becomes ordinary LRU cache);
- its TTL expires, or the session is closed: the blocks become ordinary LRU cache (still hittable);
- memory runs short: leases give way before any running request is preempted (`reclaim`).

The TTL is the request's `kv_retention_s` if it gave one (0: no lease), else a guess from the session's own
pauses: 1.5 × the 90th percentile of its last gaps between a finish and its next request, within
[MIN_TTL_S, MAX_TTL_S]; DEFAULT_TTL_S before any gap was seen. The expected return is the finish time plus
the median gap (half the TTL without one).

Eviction order under pressure, lease by lease and each from the tail of its chain (the end of a history is
evicted before its root, which other turns and sessions share): expired leases first; then the lease whose
session is expected back latest (a block held for longer saves the same recompute: its value per second held
is lowest); among equal times, the smaller lease (cheaper to recompute: attention over a shorter context).
A block shared with a running request or another lease frees nothing and is skipped over.
"""

import statistics
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedserve.engine.block_pool import BlockPool, KVBlock

DEFAULT_TTL_S = 10.0
MIN_TTL_S = 1.0
MAX_TTL_S = 120.0
NUM_GAPS = 16  # pauses remembered per session
IDLE_S = 600.0  # a session with no lease and no activity for this long is forgotten (its pauses, its service)


@dataclass
class Lease:
    blocks: list[KVBlock]  # root first; the lease holds one reference on each
    expires_at: float
    expected_return: float


@dataclass
class Session:
    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=NUM_GAPS))
    last_finish: float | None = None
    lease: Lease | None = None
    attained_service: int = 0  # tokens computed for the session so far (program-level scheduling)
    last_active: float = 0.0


class Sessions:
    def __init__(self, pool: BlockPool, block_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.block_size = block_size
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.lease_hit_tokens = 0  # prompt tokens found in a lease at admission: not recomputed thanks to it
        self.leases_evicted = 0  # leases cut short under memory pressure
        self.lease_expiries = 0  # leases whose TTL ran out

    # ---- the life of a session ------------------------------------------------------------------

    def on_arrival(self, session_id: str) -> None:
        """A request of the session arrived: the pause since its last finish is one more observed gap."""
        session = self._session(session_id)
        if session.last_finish is not None:
            session.gaps.append(self.clock() - session.last_finish)
            session.last_finish = None

    def lease(self, session_id: str, blocks: list[KVBlock], retention_s: float | None) -> None:
        """A request of the session finished: its `blocks` (full and hashed, root first, one reference each,
        handed over by the request) become the session's lease, replacing an older one."""
        session = self._session(session_id)
        now = self.clock()
        session.last_finish = now
        self.release(session_id)
        ttl = self.ttl(session) if retention_s is None else retention_s
        if ttl <= 0 or not blocks:
            self.pool.free(list(reversed(blocks)))
            return
        expected = statistics.median(session.gaps) if session.gaps else ttl / 2
        session.lease = Lease(list(blocks), now + ttl, now + min(expected, ttl))

    def ttl(self, session: Session) -> float:
        if not session.gaps:
            return DEFAULT_TTL_S
        gaps = sorted(session.gaps)
        p90 = gaps[min(len(gaps) - 1, int(0.9 * len(gaps)))]
        return min(max(1.5 * p90, MIN_TTL_S), MAX_TTL_S)

    def claim(self, session_id: str, hit_blocks: list[KVBlock]) -> None:
        """The session's next request is admitted and holds its hits: count what the lease saved, drop it."""
        session = self.sessions.get(session_id)
        if session is None or session.lease is None:
            return
        leased = {block.block_id for block in session.lease.blocks}
        self.lease_hit_tokens += self.block_size * sum(1 for block in hit_blocks if block.block_id in leased)
        self.release(session_id)

    def release(self, session_id: str) -> None:
        """Drop the session's lease: its blocks become ordinary LRU cache (tail first)."""
        session = self.sessions.get(session_id)
        if session is not None and session.lease is not None:
            self.pool.free(list(reversed(session.lease.blocks)))
            session.lease = None

    def close(self, session_id: str) -> bool:
        """Release the session and forget it; False if there is no such session."""
        if session_id not in self.sessions:
            return False
        self.release(session_id)
        del self.sessions[session_id]
        return True

    def expire(self) -> None:
        """Release the leases whose TTL ran out; forget the sessions idle for IDLE_S (a client that never closes
        its sessions must not grow this table forever)."""
        now = self.clock()
        for session_id, session in list(self.sessions.items()):
            if session.lease is not None and session.lease.expires_at <= now:
                self.release(session_id)
                self.lease_expiries += 1
            if session.lease is None and now - session.last_active > IDLE_S:
                del self.sessions[session_id]

    def add_service(self, session_id: str, num_tokens: int) -> None:
        self._session(session_id).attained_service += num_tokens

    def _session(self, session_id: str) -> Session:
        """The session, created on first sight; marked active now."""
        session = self.sessions.setdefault(session_id, Session())
        session.last_active = self.clock()
        return session

    def attained_service(self, session_id: str) -> int:
        session = self.sessions.get(session_id)
        return session.attained_service if session is not None else 0

    # ---- memory pressure -------------------------------------------------------------------------

    def num_reclaimable(self, keep: list[KVBlock]) -> int:
        """Blocks that dropping leases would free: those held only by leases, but for `keep` (about to be
        taken by a request)."""
        holders = Counter(block.block_id for lease in self._leases() for block in lease.blocks)
        for block in keep:
            holders.pop(block.block_id, None)
        return sum(1 for block_id, count in holders.items() if self.pool.blocks[block_id].ref_cnt == count)

    def reclaim(self, num_free_blocks: int) -> None:
        """Release leased blocks, in the eviction order, until the pool has `num_free_blocks` free (or no lease
        is left)."""
        now = self.clock()
        for session_id in self._eviction_order(now):
            if self.pool.num_free_blocks >= num_free_blocks:
                return
            lease = self.sessions[session_id].lease
            assert lease is not None
            self.leases_evicted += 1
            while lease.blocks and self.pool.num_free_blocks < num_free_blocks:
                self.pool.free([lease.blocks.pop()])
            if not lease.blocks:
                self.sessions[session_id].lease = None

    def _eviction_order(self, now: float) -> list[str]:
        held = [(session_id, s.lease) for session_id, s in self.sessions.items() if s.lease is not None]

        def order(item: tuple[str, Lease | None]) -> tuple:
            lease = item[1]
            assert lease is not None
            return (lease.expires_at > now, -lease.expected_return, len(lease.blocks))

        return [session_id for session_id, _ in sorted(held, key=order)]

    def _leases(self) -> list[Lease]:
        return [s.lease for s in self.sessions.values() if s.lease is not None]

    # ---- stats ---------------------------------------------------------------------------------

    @property
    def num_leases(self) -> int:
        return len(self._leases())

    @property
    def num_blocks_leased(self) -> int:
        return len({block.block_id for lease in self._leases() for block in lease.blocks})
