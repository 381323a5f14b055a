"""Agent sessions: a paused session's KV kept warm across its tool call, and the service each session got.

An agent turn ends in a tool call; seconds later the next turn arrives with the whole history. With plain LRU
prefix caching, other requests may evict the paused session's blocks meanwhile and the next turn recomputes the
history. So when a request of a session finishes, its full, hashed blocks stay held by a *lease* (one
reference per block, owned by the session, never by a request that could leak it) until:
- the session's next request is admitted: its prefix-cache hits take their own references, then the lease
  is dropped (what it held beyond the hits becomes ordinary LRU cache);
- its TTL expires, or the session is closed: the blocks become ordinary LRU cache (still hittable);
- memory runs short: leases give way before any running request is preempted (`reclaim`).

A session belongs to a tenant: it is keyed by (cache_salt, session_id), so a request or a close under another
salt names another session and can neither claim nor drop this one's lease.

The TTL is the request's `kv_retention_s` if it gave one (0: no lease), else a guess from the session's own
pauses: 1.5 × the 90th percentile of its last gaps between a finish and its next request, within
[MIN_TTL_S, MAX_TTL_S]; DEFAULT_TTL_S before any gap was seen. The expected return is the finish time plus
the median gap (half the TTL without one).

Eviction order under pressure, lease by lease and each from the tail of its chain (the end of a history is
evicted before its root, which other turns and sessions share): expired leases first; then the lease whose
session is expected back latest (a block held for longer saves the same recompute: its value per second held
is lowest); among equal times, the smaller lease (cheaper to recompute: attention over a shorter context).
A block shared with a running request or another lease frees nothing and is skipped over.

Bookkeeping is per event, never per session per step: each session has one pending wake-up in a heap (its lease's
expiry, else the moment it has been idle for IDLE_S; entries made stale by a later change are skipped when popped),
and the lease counts and the service total are kept as they change.
"""

import heapq
import itertools
import math
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

SessionKey = tuple[str | None, str]  # (tenant, session id); the tenant is the requests' cache_salt


def session_key(session_id: str, cache_salt: str | None) -> SessionKey:
    """The same session id under another cache_salt is another tenant's session ("" is no salt, as for the
    prefix cache)."""
    return cache_salt or None, session_id


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
    attained_service: int = 0  # tokens computed for the session (program-level scheduling), from its start value
    last_active: float = 0.0
    # Its pending wake-up in Sessions.wakeups: no later than its next event (lease expiry, else idle for IDLE_S).
    wake_at: float = math.inf
    wake_seq: int = -1


class Sessions:
    def __init__(self, pool: BlockPool, block_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.block_size = block_size
        self.clock = clock
        self.sessions: dict[SessionKey, Session] = {}
        self.leased: dict[SessionKey, Session] = {}  # the sessions that hold a lease now
        self.lease_holders: Counter[int] = Counter()  # block id -> how many leases hold it
        self.total_service = 0  # of the sessions in the table
        self.wakeups: list[tuple[float, int, SessionKey]] = []  # (when, seq, session): a heap, stale entries too
        self._seq = itertools.count()
        self.lease_hit_tokens = 0  # prompt tokens found in a lease at admission: not recomputed thanks to it
        self.leases_evicted = 0  # leases cut short under memory pressure
        self.lease_expiries = 0  # leases whose TTL ran out

    # ---- the life of a session ------------------------------------------------------------------

    def on_arrival(self, key: SessionKey) -> None:
        """A request of the session arrived: the pause since its last finish is one more observed gap."""
        session = self._session(key)
        if session.last_finish is not None:
            session.gaps.append(self.clock() - session.last_finish)
            session.last_finish = None

    def lease(self, key: SessionKey, blocks: list[KVBlock], retention_s: float | None) -> None:
        """A request of the session finished: its `blocks` (full and hashed, root first, one reference each,
        handed over by the request) become the session's lease, replacing an older one."""
        session = self._session(key)
        now = self.clock()
        session.last_finish = now
        self.release(key)
        ttl = self.ttl(session) if retention_s is None else retention_s
        if ttl <= 0 or not blocks:
            self.pool.free(list(reversed(blocks)))
            return
        expected = statistics.median(session.gaps) if session.gaps else ttl / 2
        session.lease = Lease(list(blocks), now + ttl, now + min(expected, ttl))
        self.leased[key] = session
        self.lease_holders.update(block.block_id for block in blocks)
        self._wake(key, session, session.lease.expires_at)

    def ttl(self, session: Session) -> float:
        if not session.gaps:
            return DEFAULT_TTL_S
        gaps = sorted(session.gaps)
        p90 = gaps[min(len(gaps) - 1, int(0.9 * len(gaps)))]
        return min(max(1.5 * p90, MIN_TTL_S), MAX_TTL_S)

    def claim(self, key: SessionKey, hit_blocks: list[KVBlock]) -> None:
        """The session's next request is admitted and holds its hits: count what the lease saved, drop it."""
        session = self.leased.get(key)
        if session is None or session.lease is None:
            return
        leased = {block.block_id for block in session.lease.blocks}
        self.lease_hit_tokens += self.block_size * sum(1 for block in hit_blocks if block.block_id in leased)
        self.release(key)

    def release(self, key: SessionKey) -> None:
        """Drop the session's lease: its blocks become ordinary LRU cache (tail first)."""
        session = self.leased.get(key)
        if session is not None:
            self.pool.free(list(reversed(self._end_lease(key, session))))

    def close(self, key: SessionKey) -> bool:
        """Release the session and forget it; False if there is no such session."""
        if key not in self.sessions:
            return False
        self.release(key)
        self._forget(key)
        return True

    def expire(self) -> int:
        """Release the leases whose TTL ran out, and forget the sessions idle for IDLE_S (a client that never
        closes its sessions must not grow this table forever). Only due wake-ups are looked at. Returns how many
        leases ran out."""
        now = self.clock()
        expired = 0
        while self.wakeups and self.wakeups[0][0] <= now:
            _, seq, key = heapq.heappop(self.wakeups)
            session = self.sessions.get(key)
            if session is None or session.wake_seq != seq:
                continue  # stale: the session was forgotten, or woken for a later event since
            session.wake_at = math.inf
            if session.lease is not None and session.lease.expires_at <= now:
                self.release(key)
                expired += 1
            if session.lease is None and session.last_active + IDLE_S <= now:
                self._forget(key)
                continue
            lease = session.lease
            self._wake(key, session, lease.expires_at if lease is not None else session.last_active + IDLE_S)
        self.lease_expiries += expired
        if len(self.wakeups) > 2 * len(self.sessions) + 64:  # mostly stale: keep the valid ones
            self.wakeups = [entry for entry in self.wakeups if self._is_valid(entry)]
            heapq.heapify(self.wakeups)
        return expired

    def seconds_to_next_wakeup(self) -> float | None:
        """How long `expire` has nothing to do (at least; None: no session)."""
        if not self.wakeups:
            return None
        return max(0.0, self.wakeups[0][0] - self.clock())

    def add_service(self, key: SessionKey, num_tokens: int) -> None:
        self._session(key).attained_service += num_tokens
        self.total_service += num_tokens

    def attained_service(self, key: SessionKey) -> int:
        """The session's service; a session not seen yet would start at the average."""
        session = self.sessions.get(key)
        return session.attained_service if session is not None else self.average_service()

    def average_service(self) -> int:
        """The running average of the live sessions' service: where a new session starts, so that a fresh id is
        no free pass to the head of the queue under the session policy."""
        return self.total_service // len(self.sessions) if self.sessions else 0

    def _session(self, key: SessionKey) -> Session:
        """The session, created on first sight (its service at the average); marked active now."""
        session = self.sessions.get(key)
        now = self.clock()
        if session is None:
            session = Session(attained_service=self.average_service())
            self.sessions[key] = session
            self.total_service += session.attained_service
            self._wake(key, session, now + IDLE_S)
        session.last_active = now  # its wake-up may now come early: it is then put off (see expire)
        return session

    def _forget(self, key: SessionKey) -> None:
        session = self.sessions.pop(key)
        assert session.lease is None
        self.total_service -= session.attained_service

    def _end_lease(self, key: SessionKey, session: Session) -> list[KVBlock]:
        """Take the lease off the session and the counts; its blocks, with their references, to the caller."""
        lease = session.lease
        assert lease is not None
        session.lease = None
        del self.leased[key]
        for block in lease.blocks:
            self._unhold(block)
        self._wake(key, session, session.last_active + IDLE_S)
        return lease.blocks

    def _unhold(self, block: KVBlock) -> None:
        """One lease less holds the block."""
        if self.lease_holders[block.block_id] == 1:
            del self.lease_holders[block.block_id]
        else:
            self.lease_holders[block.block_id] -= 1

    def _wake(self, key: SessionKey, session: Session, at: float) -> None:
        """Make sure the session is looked at by `at`."""
        if at < session.wake_at:
            session.wake_at, session.wake_seq = at, next(self._seq)
            heapq.heappush(self.wakeups, (at, session.wake_seq, key))

    def _is_valid(self, entry: tuple[float, int, SessionKey]) -> bool:
        session = self.sessions.get(entry[2])
        return session is not None and session.wake_seq == entry[1]

    # ---- memory pressure -------------------------------------------------------------------------

    def num_reclaimable(self, keep: list[KVBlock]) -> int:
        """Blocks that dropping leases would free: those held only by leases, but for `keep` (about to be
        taken by a request)."""
        kept = {block.block_id for block in keep}
        return sum(1 for block_id, count in self.lease_holders.items()
                   if block_id not in kept and self.pool.blocks[block_id].ref_cnt == count)

    def reclaim(self, num_free_blocks: int) -> None:
        """Release leased blocks, in the eviction order, until the pool has `num_free_blocks` free (or no lease
        is left)."""
        now = self.clock()
        for key in self._eviction_order(now):
            if self.pool.num_free_blocks >= num_free_blocks:
                return
            session = self.leased[key]
            lease = session.lease
            assert lease is not None
            self.leases_evicted += 1
            while lease.blocks and self.pool.num_free_blocks < num_free_blocks:
                block = lease.blocks.pop()
                self._unhold(block)
                self.pool.free([block])
            if not lease.blocks:
                self._end_lease(key, session)

    def _eviction_order(self, now: float) -> list[SessionKey]:
        def order(key: SessionKey) -> tuple:
            lease = self.leased[key].lease
            assert lease is not None
            return (lease.expires_at > now, -lease.expected_return, len(lease.blocks))

        return sorted(self.leased, key=order)

    # ---- stats ---------------------------------------------------------------------------------

    @property
    def num_leases(self) -> int:
        return len(self.leased)

    @property
    def num_blocks_leased(self) -> int:
        return len(self.lease_holders)
