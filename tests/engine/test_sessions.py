"""Agent sessions in the engine: KV held across a tool pause by a lease, TTL expiry, close, memory pressure
(leases give way before preemption), no leaks, sessions scoped by tenant (cache_salt), bookkeeping that looks only
at the sessions that are due, and the priority and session scheduling policies."""

import random

import pytest
from engine_utils import assert_all_blocks_free, make_engine, pretend_step, run_all

from pagedserve import LLM
from pagedserve.engine.block_pool import BlockPool
from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.protocol import AddRequest
from pagedserve.engine.request import Request
from pagedserve.engine.scheduler import Scheduler, make_policy
from pagedserve.engine.sessions import IDLE_S, Sessions, session_key
from pagedserve.sampling_params import SamplingParams

BS = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 500) for _ in range(length)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def engine_with_clock(llama_dir, clock, **kwargs):
    engine = make_engine(llama_dir, **kwargs)
    engine.sessions.clock = clock
    return engine


def turn(engine, request_id, token_ids, session_id=None, **kwargs):
    engine.add_request(AddRequest(request_id, token_ids, GREEDY, session_id=session_id, **kwargs))
    run = run_all(engine, leases=True)
    return run.tokens[(request_id, 0)], run.firsts[(request_id, 0)].num_cached_tokens


def fill_the_pool(engine, seed):
    """Requests of no session that take (and leave in LRU cache) every free block."""
    free_tokens = engine.stats().num_kv_blocks_free * BS
    engine.add_request(AddRequest(f"filler-{seed}", prompt(free_tokens - 8, seed), GREEDY))
    run_all(engine, leases=True)


def test_a_lease_keeps_the_history_across_a_pause(llama_dir, clock):
    """Turn 2 of a session finds turn 1's history although other requests went through the whole pool."""
    for retention, expected_hits in ((None, 48), (0, 0)):
        engine = engine_with_clock(llama_dir, clock, num_kv_blocks=12)
        history = prompt(50, seed=1)
        output, _ = turn(engine, "t1", history, "s", kv_retention_s=retention)
        stats = engine.stats()
        assert stats.num_session_leases == (retention is None)
        assert stats.num_blocks_leased == (3 if retention is None else 0)  # 57 tokens computed: 3 full blocks
        fill_the_pool(engine, seed=2)
        clock.now += 2.0  # the tool runs
        _, hits = turn(engine, "t2", history + output + prompt(20, seed=3), "s", kv_retention_s=retention)
        assert hits == expected_hits
        assert engine.stats().lease_hit_tokens == expected_hits
        assert engine.close_session("s") and not engine.close_session("s")
        assert_all_blocks_free(engine)


def test_ttl_expiry_and_close_release_blocks(llama_dir, clock):
    engine = engine_with_clock(llama_dir, clock)
    turn(engine, "a", prompt(40, 1), "s1", kv_retention_s=5.0)
    turn(engine, "b", prompt(40, 2), "s2")  # no TTL given: the default, 10 s before any pause is seen
    assert engine.stats().num_session_leases == 2
    clock.now += 6.0
    stats = engine.stats()  # no step needed: a utility call expires what is due first
    assert stats.num_session_leases == 1 and stats.lease_expiries == 1
    assert engine.close_session("s2") and engine.stats().num_session_leases == 0
    assert not engine.close_session("never-seen")
    engine.close_session("s1")
    assert_all_blocks_free(engine)


def test_the_ttl_follows_the_sessions_pauses(llama_dir, clock):
    engine = engine_with_clock(llama_dir, clock)
    history = prompt(40, 1)
    for i, pause in enumerate([4.0, 4.0, 6.0, 4.0]):
        output, _ = turn(engine, f"t{i}", history, "s")
        history = history + output + prompt(4, 10 + i)
        clock.now += pause
    session = engine.sessions.sessions[session_key("s", None)]
    assert list(session.gaps) == [4.0, 4.0, 6.0]
    assert engine.sessions.ttl(session) == pytest.approx(9.0)  # 1.5 x the 90th percentile
    assert session.lease.expires_at == pytest.approx(session.last_finish + 9.0)
    engine.close_session("s")


def test_pressure_evicts_leases_before_preempting(llama_dir, clock):
    """A pool mostly held by leases: a new request takes their blocks (tail first), nothing running is
    preempted, and nothing deadlocks."""
    engine = engine_with_clock(llama_dir, clock, num_kv_blocks=16)
    for i in range(3):
        turn(engine, f"s{i}-t1", prompt(60, i), f"s{i}")  # 67 tokens computed: 4 full blocks leased each
    assert engine.stats().num_blocks_leased == 12
    engine.add_request(AddRequest("big", prompt(200, 9), GREEDY))  # 13 blocks, growing to 14: more than the 4 free
    engine.add_request(AddRequest("small", prompt(10, 8), GREEDY))
    run = run_all(engine, leases=True)
    stats = engine.stats()
    assert len(run.tokens[("big", 0)]) == 8 and len(run.tokens[("small", 0)]) == 8
    assert stats.num_preemptions == 0 and stats.leases_evicted >= 2
    for i in range(3):
        engine.close_session(f"s{i}")
    assert_all_blocks_free(engine)


def test_aborted_and_failed_requests_leave_no_lease(llama_dir, clock, monkeypatch):
    engine = engine_with_clock(llama_dir, clock)
    engine.add_request(AddRequest("a", prompt(40, 1), SamplingParams(max_tokens=50, ignore_eos=True), session_id="s"))
    engine.step()
    engine.abort_requests(["a"])
    assert engine.stats().num_session_leases == 0

    def broken(sched, req_ids):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine.model_runner, "execute", broken)
    engine.add_request(AddRequest("b", prompt(40, 2), GREEDY, session_id="s"))
    run_all(engine, leases=True)
    assert engine.stats().num_session_leases == 0
    engine.close_session("s")
    assert_all_blocks_free(engine)


def test_outputs_are_the_same_with_leases_on_and_off(llama_dir, clock):
    """Three sessions, four turns each, interleaved, in a pool too small for all: greedy float32 tokens do not
    depend on what was kept."""
    results = {}
    for retention in (None, 0):
        engine = engine_with_clock(llama_dir, clock, num_kv_blocks=24)
        histories = {f"s{i}": prompt(30 + 7 * i, i) for i in range(3)}
        tokens = {}
        for t in range(4):
            for session_id, history in histories.items():
                engine.add_request(AddRequest(f"{session_id}-{t}", history, GREEDY, session_id=session_id,
                                   kv_retention_s=retention))
            run = run_all(engine, leases=True)
            for session_id in histories:
                out = run.tokens[(f"{session_id}-{t}", 0)]
                tokens[(session_id, t)] = out
                histories[session_id] = histories[session_id] + out + prompt(9, 100 + t)
            clock.now += 1.0
        results[retention] = tokens
        for session_id in histories:
            engine.close_session(session_id)
        assert_all_blocks_free(engine)
    assert results[None] == results[0]


def test_offline_sessions_and_priority(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64)
    history = prompt(40, 1)
    first = llm.generate({"prompt_token_ids": history, "session_id": "s"}, GREEDY, use_tqdm=False)[0]
    assert llm.stats().num_session_leases == 1
    second = llm.generate([{"prompt_token_ids": history + first.outputs[0].token_ids}], GREEDY, use_tqdm=False,
                          session_ids=["s"], priority=[3])[0]
    assert second.metrics["num_cached_tokens"] == 32 and llm.stats().lease_hit_tokens == 32  # 47 computed
    assert llm.close_session("s") and llm.stats().num_session_leases == 0
    with pytest.raises(ValueError, match="kv_retention_s"):
        llm.generate({"prompt_token_ids": history, "kv_retention_s": 5}, GREEDY, use_tqdm=False)  # no session
    with pytest.raises(ValueError, match="kv_retention_s"):
        llm.generate({"prompt_token_ids": history, "session_id": "s", "kv_retention_s": -1}, GREEDY)
    with pytest.raises(ValueError, match="got 1 prompts but 2 priority"):
        llm.generate([history], GREEDY, priority=[1, 2])


# ---- the scheduling policies, on the scheduler alone ----------------------------------------------------


def scheduler(policy: str, max_seqs: int = 1):
    kv = KVCacheManager(64, 4, enable_prefix_caching=True)
    return Scheduler(kv, 64, max_seqs, make_policy(policy, kv.sessions)), kv


def request(i: int, priority: int = 0, session_id: str | None = None, arrival: float = 0.0) -> Request:
    r = Request(f"r{i}", list(range(1, 6)), SamplingParams(max_tokens=2), None, 10_000, priority=priority,
                session_id=session_id, arrival_index=i, arrival_time=arrival)
    return r


def served(kv: KVCacheManager, **service: int) -> None:
    """Sessions that have had this much service (started together: each at 0)."""
    for session_id in service:
        kv.sessions.on_arrival(session_key(session_id, None))
    for session_id, tokens in service.items():
        kv.sessions.add_service(session_key(session_id, None), tokens)


def admission_order(sched: Scheduler) -> list[str]:
    order = []
    while sched.has_unfinished():
        order += [r for r in pretend_step(sched) if r not in order]
    return order


def test_fcfs_and_priority_order(clock):
    sched, _ = scheduler("fcfs")
    for i, p in enumerate([5, 1, 3]):
        sched.add_request(request(i, priority=p))
    assert admission_order(sched) == ["r0", "r1", "r2"]
    sched, _ = scheduler("priority")
    for i, p in enumerate([5, 1, 3, 1]):
        sched.add_request(request(i, priority=p))
    assert admission_order(sched) == ["r1", "r3", "r2", "r0"]  # lower first, then arrival


def test_session_policy_serves_the_least_served_session_first(monkeypatch):
    sched, kv = scheduler("session")
    served(kv, long=5000, short=100)
    now = 100.0
    monkeypatch.setattr("pagedserve.engine.scheduler.time.monotonic", lambda: now)
    sched.add_request(request(0, session_id="long", arrival=now))
    sched.add_request(request(1, session_id="short", arrival=now))
    sched.add_request(request(2, session_id="long", arrival=now))
    sched.add_request(request(3, arrival=now))  # no session: a program of its own, starting at the average
    assert admission_order(sched) == ["r1", "r3", "r0", "r2"]
    # aging: a request of the long session that has waited 5 s (5,000 tokens of credit) goes before a new one
    sched.add_request(request(4, session_id="long", arrival=now - 5.5))
    sched.add_request(request(5, session_id="short", arrival=now))
    assert admission_order(sched) == ["r4", "r5"]


def test_the_policy_picks_the_preemption_victim():
    """Under the priority policy the lowest-priority running request is preempted, whenever it arrived."""
    kv = KVCacheManager(5, 4, enable_prefix_caching=False)
    sched = Scheduler(kv, 64, 4, make_policy("priority", kv.sessions))
    low, high = request(0, priority=9), request(1, priority=0)
    low.prompt_token_ids = high.prompt_token_ids = list(range(1, 8))
    for r in (low, high):
        r.sampling_params = SamplingParams(max_tokens=8)
        sched.add_request(r)
    for _ in range(3):
        pretend_step(sched)  # both need a third block at the 9th token: only 5 blocks
    assert sched.num_preemptions >= 1 and high in sched.running and low not in sched.running


def test_idle_sessions_are_forgotten(llama_dir, clock):
    engine = engine_with_clock(llama_dir, clock)
    turn(engine, "a", prompt(40, 1), "s", kv_retention_s=5.0)
    clock.now += 6.0
    engine.step()
    assert session_key("s", None) in engine.sessions.sessions  # its lease expired, but it is remembered a while
    clock.now += 601.0
    engine.step()
    assert session_key("s", None) not in engine.sessions.sessions and not engine.close_session("s")
    assert_all_blocks_free(engine)


# ---- tenants --------------------------------------------------------------------------------------------


def test_a_session_belongs_to_its_cache_salt(llama_dir, clock):
    """Another tenant (another cache_salt) reusing the session id can neither close the session nor drop its
    lease: its requests make a session of its own."""
    engine = engine_with_clock(llama_dir, clock)
    history = prompt(40, 1)
    turn(engine, "a1", history, "s", cache_salt="tenant-a")
    assert engine.stats().num_session_leases == 1
    assert not engine.close_session("s") and not engine.close_session("s", "tenant-b")
    turn(engine, "b1", history, "s", cache_salt="tenant-b")  # admitted under the same id: A's lease stays
    stats = engine.stats()
    assert stats.num_session_leases == 2 and stats.lease_hit_tokens == 0
    _, hits = turn(engine, "a2", history + prompt(8, 2), "s", cache_salt="tenant-a")
    assert hits == 32 and engine.stats().lease_hit_tokens == 32  # A's next turn still finds its history
    assert engine.close_session("s", "tenant-a") and engine.stats().num_session_leases == 1
    assert engine.close_session("s", "tenant-b") and not engine.close_session("s", "tenant-b")
    assert_all_blocks_free(engine)


def test_a_new_session_starts_at_the_average_service(monkeypatch):
    """Under the session policy a fresh session id is no free pass: it starts at the live sessions' average
    service (here 2,550 tokens), behind the short session, ahead of the long one."""
    sched, kv = scheduler("session")
    served(kv, long=5000, short=100)
    now = 100.0
    monkeypatch.setattr("pagedserve.engine.scheduler.time.monotonic", lambda: now)
    sched.add_request(request(0, session_id="long", arrival=now))
    sched.add_request(request(1, session_id="fresh", arrival=now))
    sched.add_request(request(2, session_id="short", arrival=now))
    assert admission_order(sched) == ["r2", "r1", "r0"]
    assert kv.sessions.sessions[session_key("fresh", None)].attained_service == 2550  # where it started


# ---- bookkeeping cost: only what is due is looked at ------------------------------------------------------


class NoScan(dict):
    """A session table that fails a test if anything walks through all of it."""

    def _scan(self, *args):
        raise AssertionError("the whole session table was scanned")

    __iter__ = keys = values = items = _scan  # type: ignore[assignment]


def test_session_counts_stay_right_without_scanning_the_table(clock):
    """Thousands of leased sessions, and random leases, claims, closes, service, pressure and time: each step's
    bookkeeping (expire, the lease gauges, the average service) never walks the table, and its counts always
    equal a recount."""
    rng = random.Random(0)
    pool = BlockPool(6000)
    sessions = Sessions(pool, BS, clock)
    sessions.sessions = NoScan()
    roots = pool.allocate(4)  # shared by many leases, as a system prompt is
    keys = [session_key(f"s{i}", rng.choice([None, "a", "b"])) for i in range(2000)]

    def lease(key):
        root = rng.choice(roots)
        pool.touch([root])
        sessions.lease(key, [root, *pool.allocate(rng.randint(0, 2))], rng.choice([None, 0, 3.0, 30.0, 900.0]))

    def recount():
        table = dict.values(sessions.sessions)
        leases = [s.lease for s in table if s.lease is not None]
        assert sessions.num_leases == len(leases)
        assert sessions.num_blocks_leased == len({b.block_id for lease in leases for b in lease.blocks})
        assert sessions.average_service() == (sum(s.attained_service for s in table) // len(table) if table else 0)
        now = clock.now
        assert all(lease.expires_at > now for lease in leases), "a lease outlived its TTL"
        assert all(s.lease is not None or s.last_active + IDLE_S > now for s in table), "an idle session was kept"

    for key in keys:
        sessions.on_arrival(key)
        sessions.add_service(key, rng.randint(1, 500))
        lease(key)
    expired = 0
    for step in range(400):
        clock.now += rng.choice([0.1, 1.0, 5.0, 60.0])
        for key in rng.sample(keys, 20):
            action = rng.random()
            if action < 0.3:
                sessions.on_arrival(key)
                sessions.claim(key, [])
            elif action < 0.6:
                sessions.add_service(key, rng.randint(1, 100))
                lease(key)
            elif action < 0.7:
                sessions.close(key)
            else:
                sessions.add_service(key, rng.randint(1, 100))
        if step % 50 == 0:
            sessions.reclaim(pool.num_free_blocks + 20)
        due = sum(1 for s in dict.values(sessions.sessions) if s.lease is not None and s.lease.expires_at <= clock.now)
        expired += due
        assert sessions.expire() == due
        recount()
    assert sessions.lease_expiries == expired > 0 and sessions.leases_evicted > 0
    assert len(sessions.wakeups) <= 2 * len(sessions.sessions) + 64  # stale wake-ups do not pile up
    clock.now += 10 * IDLE_S
    sessions.expire()
    recount()
    assert not dict.values(sessions.sessions) and pool.num_free_blocks == pool.num_blocks - len(roots)
