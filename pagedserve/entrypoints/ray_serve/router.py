"""Which replica serves a request: sessions first, then the engine's own prefix-cache block hashes, then
power-of-two choices on queue length (`--router session|prefix|round-robin`).

Under `session`, a session's request goes to the replica that served it (unless that one is overloaded or
gone); a new session goes to the replicas holding the fewest sessions (its history will grow in that KV pool),
the longest cached prefix among them; a request without a session, to the longest cached prefix; else to the
less loaded of two random replicas. `prefix` is the last two; `round-robin` ignores both.

`RoutingPolicy` is the decision, pure and testable without Ray; `PagedServeRouter` is the Ray Serve
`RequestRouter` that feeds it the replicas, their queue lengths and each request's arguments (a
`ReplicaRequest`), and tells it where requests went and which replicas died.

The prefix index is the router's own, approximate: for each replica, the hashes of the full prompt blocks it
routed there (the engine's `hash_block`, chained and salted as the engine chains them), bounded, least
recently used first out, like the engine's own cache. A replica that dies or leaves loses its sessions and
its index, so its sessions move.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from pagedserve.engine.kv_cache_manager import hash_block
from pagedserve.engine.protocol import AddRequest

logger = logging.getLogger("pagedserve")
T = TypeVar("T")

POLICIES = ("session", "prefix", "round-robin")
DEFAULT_INDEX_BLOCKS = 65536  # per replica: 32 B a hash, ~2 MiB a replica at most
DEFAULT_MAX_PREFIX_BLOCKS = 256  # hashes looked at per prompt: enough to tell sessions apart, cheap to compute
MAX_PENDING = 4096  # requests being routed at once, at most, whose hashes the router keeps
DEFAULT_MAX_SESSIONS = 100_000  # sessions remembered; the least recently seen are forgotten first
DEFAULT_IMBALANCE = 8  # a replica this many requests above the least loaded one is overloaded


@dataclass
class ReplicaRequest:
    """What the ingress sends a replica for one prompt: the request's record (the router reads it, the replica
    runs it) and where not to send it."""

    request: AddRequest
    avoid: tuple[str, ...] = ()  # replicas that refused it (engine down, queue full): others first


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None,
                        max_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS) -> list[bytes]:
    """The hashes the engine gives the prompt's first full blocks (salt on the first, chained after)."""
    hashes: list[bytes] = []
    parent: bytes | None = None
    for i in range(min(len(token_ids) // block_size, max_blocks)):
        extra = (cache_salt,) if (i == 0 and cache_salt) else ()
        parent = hash_block(parent, list(token_ids[i * block_size:(i + 1) * block_size]), extra)
        hashes.append(parent)
    return hashes


@dataclass
class PrefixIndex:
    """The block hashes one replica is thought to hold, least recently used first."""

    max_blocks: int = DEFAULT_INDEX_BLOCKS
    hashes: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def add(self, block_hashes: Sequence[bytes]) -> None:
        for h in block_hashes:
            self.hashes[h] = None
            self.hashes.move_to_end(h)
        while len(self.hashes) > self.max_blocks:
            self.hashes.popitem(last=False)

    def matched(self, block_hashes: Sequence[bytes]) -> int:
        """How many of the prompt's first blocks the replica holds, in a row (the chain makes later hits
        without the earlier ones impossible)."""
        n = 0
        for h in block_hashes:
            if h not in self.hashes:
                break
            n += 1
        return n


class RoutingPolicy:
    """The routing decision over replica ids (strings) and their queue lengths (None: unknown)."""

    def __init__(self, policy: str = "session", block_size: int = 16, imbalance: int = DEFAULT_IMBALANCE,
                 index_blocks: int = DEFAULT_INDEX_BLOCKS, max_prefix_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, seed: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"router policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.block_size = block_size
        self.imbalance = imbalance
        self.index_blocks = index_blocks
        self.max_prefix_blocks = max_prefix_blocks
        # session id -> the replica that served its last request, least recently used first out
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self.max_sessions = max_sessions
        self.session_counts: Counter[str] = Counter()  # sessions per replica, of those remembered
        self.indexes: dict[str, PrefixIndex] = {}
        self.turn = itertools.count()
        self.rng = random.Random(seed)

    def hashes_of(self, request: ReplicaRequest) -> list[bytes]:
        if self.policy == "round-robin":
            return []
        return prefix_block_hashes(request.request.prompt_token_ids, self.block_size, request.request.cache_salt,
                                   self.max_prefix_blocks)

    def rank(self, replicas: Sequence[str], queue_lens: dict[str, int | None], request: ReplicaRequest | None,
             hashes: Sequence[bytes] = ()) -> list[list[str]]:
        """Replicas in order of preference, as ranks (Ray takes the least loaded that accepts from the first
        rank that has one)."""
        if not replicas:
            return []
        if request is not None and request.avoid:
            replicas = [r for r in replicas if r not in request.avoid] or list(replicas)
        if self.policy == "round-robin" or request is None:
            start = next(self.turn) % len(replicas)
            return [[replicas[(start + i) % len(replicas)]] for i in range(len(replicas))]
        healthy = [r for r in replicas if not self.overloaded(r, replicas, queue_lens)]
        ranks: list[list[str]] = []
        if self.policy == "session" and request.request.session_id is not None:
            owner = self.sessions.get(request.request.session_id)
            if owner in healthy:
                ranks.append([owner])
            else:  # a new session, or one moving: its history will grow in its replica's KV pool, so the
                # replicas holding the fewest sessions (a shared system prompt must not pull every session to
                # the first replica that cached it); among them, the longest cached prefix
                fewest = self.fewest_sessions(healthy or list(replicas))
                tied = self.best_prefix(fewest, hashes) or fewest
                chosen = min(self.rng.sample(tied, len(tied)), key=lambda r: queue_lens.get(r) or 0)
                self.assign(request.request.session_id, chosen)  # now: new sessions Ray routes meanwhile count it
                ranks.append([chosen])
        best = self.best_prefix(healthy, hashes)
        if best:
            ranks.append(best)
        ranks.append(self.two_choices(healthy or list(replicas)))
        ranks.append(list(replicas))  # all of them overloaded or full: whichever frees a slot
        return ranks

    def overloaded(self, replica: str, replicas: Sequence[str], queue_lens: dict[str, int | None]) -> bool:
        known = [q for r in replicas if (q := queue_lens.get(r)) is not None]
        mine = queue_lens.get(replica)
        return mine is not None and bool(known) and mine - min(known) > self.imbalance

    def best_prefix(self, replicas: Sequence[str], hashes: Sequence[bytes]) -> list[str]:
        """The replicas holding the longest run of the prompt's first blocks (none if no replica holds one)."""
        matched = {r: self.indexes[r].matched(hashes) for r in replicas if r in self.indexes}
        longest = max(matched.values(), default=0)
        return [r for r, n in matched.items() if n == longest] if longest else []

    def fewest_sessions(self, replicas: Sequence[str]) -> list[str]:
        least = min(self.session_counts[r] for r in replicas)
        return [r for r in replicas if self.session_counts[r] == least]

    def two_choices(self, replicas: Sequence[str]) -> list[str]:
        return self.rng.sample(list(replicas), min(2, len(replicas)))

    def routed(self, replica: str, request: ReplicaRequest | None, hashes: Sequence[bytes]) -> None:
        """The request went to `replica`: its session and its prompt's blocks are there now."""
        if request is None:
            return
        if request.request.session_id is not None:
            self.assign(request.request.session_id, replica)
        if hashes:
            self.indexes.setdefault(replica, PrefixIndex(self.index_blocks)).add(hashes)

    def assign(self, session_id: str, replica: str) -> None:
        before = self.sessions.get(session_id)
        if before != replica:
            if before is not None:
                self.session_counts[before] -= 1
            self.session_counts[replica] += 1
        self.sessions[session_id] = replica
        self.sessions.move_to_end(session_id)
        while len(self.sessions) > self.max_sessions:
            _, evicted_from = self.sessions.popitem(last=False)
            self.session_counts[evicted_from] -= 1

    def forget(self, replica: str) -> None:
        """The replica is gone: its sessions move and nothing is thought cached there."""
        self.indexes.pop(replica, None)
        self.session_counts.pop(replica, None)
        moved = [s for s, r in self.sessions.items() if r == replica]
        for session in moved:
            del self.sessions[session]
        if moved:
            logger.info("replica %s left; %d sessions will move", replica, len(moved))


ROUTER_CLASS = "pagedserve.entrypoints.ray_serve.router.PagedServeRouter"


class PagedServeRouter(RequestRouter):
    """Ray Serve's hooks around `RoutingPolicy`."""

    def initialize_state(self, **kwargs: Any) -> None:
        """`request_router_kwargs`: RoutingPolicy's arguments (policy, block_size, imbalance, index_blocks)."""
        self.policy = RoutingPolicy(**kwargs)
        # internal request id -> its prompt's block hashes, while it is routed (bounded: a request cancelled
        # before it was routed never comes back for its entry)
        self.pending_hashes: OrderedDict[str, list[bytes]] = OrderedDict()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # back off between rounds, not spin
        request = _first_of(pending_request, ReplicaRequest) if pending_request is not None else None
        hashes = self._hashes(pending_request, request)
        cache = self.replica_queue_len_cache
        queue_lens = {rid: cache.get(r.replica_id) for rid, r in by_id.items()}
        ranks = self.policy.rank(list(by_id), queue_lens, request, hashes)
        return [[by_id[rid] for rid in rank] for rank in ranks]

    def _hashes(self, pending_request: PendingRequest | None, request: ReplicaRequest | None) -> list[bytes]:
        if pending_request is None or request is None:
            return []
        key = pending_request.metadata.internal_request_id
        if key not in self.pending_hashes:  # routing may take several rounds: hash once
            self.pending_hashes[key] = self.policy.hashes_of(request)
            while len(self.pending_hashes) > MAX_PENDING:
                self.pending_hashes.popitem(last=False)
        return self.pending_hashes[key]

    async def _choose_replica_for_request(self, pending_request: PendingRequest, *,
                                          is_retry: bool = False) -> RunningReplica:
        """Ray's choice among the ranks, recorded: `on_request_routed` is only called when replicas may
        reject requests (strict max_ongoing_requests), and the policy must learn every choice."""
        replica = await super()._choose_replica_for_request(pending_request, is_retry=is_retry)
        request = _first_of(pending_request, ReplicaRequest)
        hashes = self.pending_hashes.pop(pending_request.metadata.internal_request_id, [])
        self.policy.routed(replica.replica_id.unique_id, request, hashes)
        if request is not None:
            logger.debug("request %s (session %s) -> replica %s", request.request.request_id,
                         request.request.session_id, replica.replica_id.unique_id)
        return replica

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = set(self._replica_id_set)
        super().update_replicas(replicas)
        for gone in before - set(self._replica_id_set):
            self.policy.forget(gone.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id.unique_id)


def _first_of(pending_request: PendingRequest, kind: type[T]) -> T | None:
    """By name, not isinstance: Ray Serve ships the router class by value, with its own copies of this
    module's classes, while the arguments are instances of the imported ones."""
    for arg in pending_request.args:
        if type(arg).__qualname__ == kind.__qualname__ and type(arg).__module__ == kind.__module__:
            return cast(T, arg)
    return None
