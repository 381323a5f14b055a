"""Data-parallel replicas on Ray Serve (pagedserve/entrypoints/ray_serve/): the router's policy on its own,
then one local Ray (2 CPUs) serving a tiny checkpoint from two replicas: sessions stay on their replica,
greedy outputs equal one engine's, and a replica killed mid-run leaves the run complete."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed: pip install 'pagedserve[ray]'")
serve = pytest.importorskip("ray.serve")

from ray.exceptions import ActorDiedError, RayTaskError  # noqa: E402

from pagedserve import LLM, SamplingParams  # noqa: E402
from pagedserve.engine.kv_cache_manager import KVCacheManager  # noqa: E402
from pagedserve.engine.protocol import AddRequest  # noqa: E402
from pagedserve.engine.request import Request  # noqa: E402
from pagedserve.entrypoints.ray_serve.router import (  # noqa: E402
    PrefixIndex,
    ReplicaRequest,
    RoutingPolicy,
    prefix_block_hashes,
)
from pagedserve.outputs import RequestOutput  # noqa: E402

# ---- the policy, without Ray ---------------------------------------------------------------------------


def request(token_ids: list[int], session: str | None = None, salt: str | None = None) -> ReplicaRequest:
    return ReplicaRequest(AddRequest("r", token_ids, SamplingParams(max_tokens=1), cache_salt=salt, session_id=session))


def route(policy: RoutingPolicy, replicas: list[str], req: ReplicaRequest,
          queue_lens: dict[str, int | None] | None = None) -> str:
    """What Ray does with the ranks: the first rank's least loaded replica; then record it."""
    queue_lens = queue_lens or {}
    hashes = policy.hashes_of(req)
    first = policy.rank(replicas, queue_lens, req, hashes)[0]
    chosen = min(first, key=lambda r: queue_lens.get(r) or 0)
    policy.routed(chosen, req, hashes)
    return chosen


def test_block_hashes_are_the_engines():
    token_ids = list(range(3, 3 + 16 * 5 + 7))
    manager = KVCacheManager(num_blocks=16, block_size=16, enable_prefix_caching=True)
    for salt in (None, "tenant-a"):
        engine_request = Request(f"x-{salt}", token_ids, SamplingParams(max_tokens=1), 2, 1024, cache_salt=salt)
        assert prefix_block_hashes(token_ids, 16, salt) == manager.block_hashes(engine_request)
    assert prefix_block_hashes(token_ids, 16, max_blocks=2) == prefix_block_hashes(token_ids, 16)[:2]


def test_a_session_stays_on_its_replica():
    policy = RoutingPolicy("session", block_size=4, seed=0)
    replicas = ["a", "b", "c"]
    first = {s: route(policy, replicas, request([s * 10 + i for i in range(8)], f"s{s}")) for s in range(6)}
    for turn in range(3):
        for s, owner in first.items():
            other_prompt = [99 - turn] * 8  # nothing in common with the first turn: only the session decides
            assert route(policy, replicas, request(other_prompt, f"s{s}")) == owner


def test_new_sessions_sharing_a_system_prompt_spread_over_the_replicas():
    policy = RoutingPolicy("session", block_size=4, seed=0)
    system = list(range(40))  # ten blocks every session shares
    owners = [route(policy, ["a", "b", "c"], request(system + [100 + s] * 4, f"s{s}")) for s in range(9)]
    assert sorted(owners.count(r) for r in "abc") == [3, 3, 3]
    # new sessions ranked before any of them is routed (Ray routes concurrently) spread too
    policy = RoutingPolicy("session", block_size=4, seed=0)
    policy.routed("a", request([1] * 4, "old"), [])
    firsts = [policy.rank(["a", "b"], {}, request(system, f"n{s}"), [])[0] for s in range(5)]
    assert firsts[0] == ["b"] and sorted(r for [r] in firsts[1:]) == ["a", "a", "b", "b"]
    # without a session, the same prompt goes where its prefix is cached
    policy.routed("c", request(system + [7] * 8), policy.hashes_of(request(system + [7] * 8)))
    assert route(policy, ["a", "b", "c"], request(system + [7] * 8 + [1] * 4)) == "c"


def test_prefix_match_picks_the_replica_holding_the_longest_run():
    policy = RoutingPolicy("prefix", block_size=4, seed=0)
    shared, tail_b = list(range(8)), list(range(100, 108))
    policy.routed("a", request(shared), policy.hashes_of(request(shared)))
    policy.routed("b", request(shared + tail_b), policy.hashes_of(request(shared + tail_b)))
    # b holds 4 of the prompt's blocks in a row, a only 2
    assert policy.rank(["a", "b"], {}, request(shared + tail_b + [7] * 8),
                       policy.hashes_of(request(shared + tail_b + [7] * 8)))[0] == ["b"]
    # both hold the first two: a tie, which Ray breaks by queue length
    prompt = shared + [55] * 8
    assert sorted(policy.rank(["a", "b"], {}, request(prompt), policy.hashes_of(request(prompt)))[0]) == ["a", "b"]
    # another salt: another chain, no match
    salted = request(shared + tail_b, salt="other")
    assert policy.best_prefix(["a", "b"], policy.hashes_of(salted)) == []


def test_prefix_index_is_bounded_lru():
    index = PrefixIndex(max_blocks=3)
    index.add([b"1", b"2", b"3"])
    index.add([b"1"])  # used again: the most recent
    index.add([b"4"])
    assert index.matched([b"1"]) == 1 and index.matched([b"2"]) == 0 and len(index.hashes) == 3


def test_no_session_no_prefix_two_choices_by_queue_length():
    policy = RoutingPolicy("session", block_size=4, seed=1)
    replicas = ["a", "b", "c", "d"]
    counts = {r: 0 for r in replicas}
    for i in range(400):
        ranks = policy.rank(replicas, {}, request([i] * 3))  # shorter than a block: no hashes
        assert len(ranks[0]) == 2 and len(set(ranks[0])) == 2
        for r in ranks[0]:
            counts[r] += 1
    assert min(counts.values()) > 120  # two random replicas each time: every one is offered
    # of the two offered, Ray takes the shorter queue
    assert route(policy, ["a", "b"], request([1, 2]), {"a": 5, "b": 1}) == "b"


def test_an_overloaded_replica_loses_its_sessions_to_the_others():
    policy = RoutingPolicy("session", block_size=4, imbalance=4, seed=0)
    assert route(policy, ["a", "b"], request([1] * 8, "s"), {"a": 0, "b": 3}) == "a"
    assert route(policy, ["a", "b"], request([2] * 8, "s"), {"a": 4, "b": 1}) == "a"  # within the slack: stays
    assert route(policy, ["a", "b"], request([3] * 8, "s"), {"a": 9, "b": 1}) == "b"  # overloaded: moves
    assert route(policy, ["a", "b"], request([4] * 8, "s"), {"a": 0, "b": 1}) == "b"  # and stays moved


def test_a_dead_replica_loses_its_sessions_and_index():
    policy = RoutingPolicy("session", block_size=4, seed=0)
    prompt = list(range(16))
    assert route(policy, ["a", "b"], request(prompt, "s"), {"a": 0, "b": 2}) == "a"
    policy.forget("a")
    assert "s" not in policy.sessions and "a" not in policy.indexes
    assert route(policy, ["b", "c"], request(prompt, "s"), {"b": 0, "c": 3}) == "b"
    assert policy.sessions["s"] == "b"


def test_the_session_table_is_bounded():
    policy = RoutingPolicy("session", block_size=4, max_sessions=3, seed=0)
    for s in range(5):
        route(policy, ["a", "b"], request([s] * 8, f"s{s}"))
    route(policy, ["a", "b"], request([2] * 8, "s2"))  # seen again: the most recent
    route(policy, ["a", "b"], request([5] * 8, "s5"))
    assert list(policy.sessions) == ["s4", "s2", "s5"]


def test_a_replica_that_refused_a_request_is_avoided_for_it():
    policy = RoutingPolicy("session", block_size=4, seed=0)
    assert route(policy, ["a", "b"], request([1] * 8, "s"), {"a": 0, "b": 1}) == "a"
    retry = request([1] * 8, "s")
    retry.avoid = ("a",)
    assert route(policy, ["a", "b"], retry, {"a": 0, "b": 1}) == "b"
    retry.avoid = ("a", "b")  # every replica refused: try them all again
    assert policy.rank(["a", "b"], {}, retry, [])


def test_round_robin_ignores_sessions():
    policy = RoutingPolicy("round-robin")
    firsts = [policy.rank(["a", "b", "c"], {}, request([1] * 8, "s"))[0] for _ in range(6)]
    assert firsts == [["a"], ["b"], ["c"], ["a"], ["b"], ["c"]]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="router policy"):
        RoutingPolicy("sticky")


# ---- the application's deployments, as built (no cluster) ------------------------------------------------


def replica_config(router: str, **settings: object):
    from pagedserve.engine_args import EngineArgs
    from pagedserve.entrypoints.openai.serving import ServingOptions
    from pagedserve.entrypoints.ray_serve.app import ReplicaSettings, build_application

    app = build_application(EngineArgs(model="unused", block_size=32, max_num_seqs=64),
                            ServingOptions(model_name="m"), ReplicaSettings(router=router, **settings))
    replica = app._bound_deployment.init_args[0]._bound_deployment  # the ingress is bound to the replicas
    return replica._deployment_config


def test_the_replicas_get_the_router_and_the_autoscaling_config():
    config = replica_config("prefix", autoscaling_config={"min_replicas": 1, "max_replicas": 4},
                            shutdown_timeout=12.0)
    assert config.autoscaling_config.min_replicas == 1 and config.autoscaling_config.max_replicas == 4
    assert config.request_router_config.request_router_class.endswith("router.PagedServeRouter")
    assert config.request_router_config.request_router_kwargs == {"policy": "prefix", "block_size": 32,
                                                                  "imbalance": 8}
    assert config.graceful_shutdown_timeout_s == 12.0 and config.max_ongoing_requests == 64 + 4096
    fixed = replica_config("session", num_replicas=3)
    assert fixed.num_replicas == 3 and fixed.autoscaling_config is None
    assert replica_config("ray-prefix").request_router_config.request_router_class.endswith(
        "PrefixCacheAffinityRouter")


# ---- the ingress's engine over a fake replica deployment: retries, mid-stream deaths, shutdown -------------


class FakeResponse:
    """A replica's response stream: its id, then outputs; `die_after` outputs, the replica dies; `refuse`: the
    replica's engine refuses the request (as Ray delivers it: a RayTaskError)."""

    def __init__(self, replica: str, outputs: int, die_after: int | None = None, hang: bool = False,
                 refuse: Exception | None = None) -> None:
        self.replica, self.outputs, self.die_after, self.hang, self.refuse = replica, outputs, die_after, hang, refuse
        self.cancelled = False

    def __aiter__(self):
        return self._items()

    async def _items(self):
        if self.die_after == -1:
            raise ActorDiedError()
        yield self.replica
        if self.refuse is not None:
            raise RayTaskError("generate", "traceback", self.refuse)
        for i in range(self.outputs):
            if i == self.die_after:
                raise ActorDiedError()
            yield RequestOutput("r", None, [1, 2, 3], [], finished=i == self.outputs - 1)
        if self.hang:
            await asyncio.Event().wait()

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """`handle.options(stream=True).generate.remote(request)`, answered from a script."""

    def __init__(self, responses: list[FakeResponse]) -> None:
        self.responses = responses
        self.requests: list[ReplicaRequest] = []

    def options(self, **_: object) -> "FakeHandle":
        return self

    @property
    def generate(self) -> "FakeHandle":
        return self

    def remote(self, request: ReplicaRequest) -> FakeResponse:
        self.requests.append(request)
        return self.responses.pop(0)


def remote_engine(llama_dir: str, responses: list[FakeResponse]):
    from pagedserve.engine.protocol import ModelLimits
    from pagedserve.engine_args import EngineArgs
    from pagedserve.entrypoints.ray_serve import remote_engine as module

    module.RETRY_DELAY_S = 0.0
    engine = module.RemoteEngine(FakeHandle(responses), EngineArgs(model=llama_dir, dtype="float32"))
    engine.input_processor.limits = ModelLimits(vocab_size=512, max_model_len=1024, max_num_seqs=8,
                                                kv_cache_tokens=4096)
    engine.errored = None
    return engine


def admit(engine, token_ids: list[int], request_id: str, **kwargs):
    request = engine.input_processor.make_request({"prompt_token_ids": token_ids}, SamplingParams(max_tokens=3),
                                                  request_id, **kwargs)
    return engine.add_request(request)


async def collect(engine, served_by=None) -> list:
    from pagedserve.entrypoints.ray_serve.remote_engine import SERVED_BY

    if served_by is not None:
        SERVED_BY.set(served_by)
    stream = admit(engine, [5, 6, 7], "req-1", session_id="s")
    return [output async for output in stream]


def test_a_request_whose_replica_died_before_it_started_goes_to_another(llama_dir):
    from pagedserve.entrypoints.ray_serve.remote_engine import ServedBy

    engine = remote_engine(llama_dir, [FakeResponse("a", 3, die_after=-1), FakeResponse("b", 3)])
    served_by = ServedBy()

    async def run() -> list:
        return await collect(engine, served_by)

    outputs = asyncio.run(run())
    assert len(outputs) == 3 and outputs[-1].finished
    assert [r.request.session_id for r in engine.handle.requests] == ["s", "s"]  # sent twice, the same request
    assert engine.handle.requests[0].request.prompt_token_ids == [5, 6, 7]
    assert served_by.replicas == ["b"] and served_by.known.is_set()
    assert not engine.responses and not engine.failures  # nothing left behind


def test_a_request_refused_by_a_replica_goes_to_another_then_fails_with_the_engines_error(llama_dir):
    from pagedserve.entrypoints.ray_serve.remote_engine import MAX_ATTEMPTS
    from pagedserve.frontend.async_llm import EngineDeadError, QueueFullError

    engine = remote_engine(llama_dir, [FakeResponse("a", 3, refuse=EngineDeadError("the engine is not running")),
                                       FakeResponse("b", 3)])
    assert len(asyncio.run(collect(engine))) == 3
    assert [r.avoid for r in engine.handle.requests][-1] == ("a",)
    engine = remote_engine(llama_dir, [FakeResponse(str(i), 3, refuse=QueueFullError("full"))
                                       for i in range(MAX_ATTEMPTS)])
    with pytest.raises(QueueFullError, match="full"):  # a 503, as from one engine
        asyncio.run(collect(engine))


def test_a_replica_dying_mid_stream_fails_the_request_clearly(llama_dir):
    from pagedserve.frontend.async_llm import EngineDeadError

    engine = remote_engine(llama_dir, [FakeResponse("a", 3, die_after=1), FakeResponse("b", 3)])
    with pytest.raises(EngineDeadError, match="the replica serving this request died"):
        asyncio.run(collect(engine))
    assert len(engine.handle.requests) == 1  # outputs were sent already: not run again


def test_a_replica_that_keeps_dying_is_not_retried_forever(llama_dir):
    from pagedserve.entrypoints.ray_serve.remote_engine import MAX_ATTEMPTS
    from pagedserve.frontend.async_llm import EngineDeadError

    engine = remote_engine(llama_dir, [FakeResponse(str(i), 3, die_after=-1) for i in range(MAX_ATTEMPTS)])
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(engine))
    assert len(engine.handle.requests) == MAX_ATTEMPTS


def test_end_requests_ends_open_streams_at_once(llama_dir):
    from pagedserve.frontend.async_llm import EngineDeadError

    response = FakeResponse("a", 1, hang=True)
    engine = remote_engine(llama_dir, [response])

    async def run() -> list:
        stream = admit(engine, [5, 6, 7], "req-1")
        first = await stream.__anext__()
        engine.end_requests("the server is shutting down")
        with pytest.raises(EngineDeadError, match="shutting down"):
            await asyncio.wait_for(stream.__anext__(), 5)
        return [first]

    assert len(asyncio.run(run())) == 1
    assert response.cancelled


def test_abort_cancels_the_replicas_stream(llama_dir):
    """The client went away: cancelling the replica's stream aborts the request in its engine."""
    response = FakeResponse("a", 1, hang=True)
    engine = remote_engine(llama_dir, [response])

    async def run() -> None:
        stream = admit(engine, [5, 6, 7], "req-1")
        await stream.__anext__()
        engine.abort("req-1")

    asyncio.run(run())
    assert response.cancelled and not engine.responses and not engine.failures


@pytest.mark.parametrize("outputs_read", [0, 1])
def test_a_stream_dropped_unfinished_is_aborted(llama_dir, outputs_read):
    """The client went away before the first output (its stream never iterated, though its first output was
    fetched), or after one: the replica's stream is cancelled and nothing of the request is kept."""
    response = FakeResponse("a", 2, hang=True)
    engine = remote_engine(llama_dir, [response])

    async def run() -> None:
        stream = admit(engine, [5, 6, 7], "req-1")
        await asyncio.sleep(0.05)  # routed: its first output is here
        for _ in range(outputs_read):
            await stream.__anext__()
        del stream
        await asyncio.sleep(0)  # the abort runs on the loop
        assert response.cancelled and not engine.responses and not engine.failures and not engine.prefetches

    asyncio.run(run())


def test_bad_input_is_refused_before_any_replica_sees_it(llama_dir):
    engine = remote_engine(llama_dir, [])
    with pytest.raises(ValueError):
        admit(engine, [5, 9999], "req-1")
    assert engine.handle.requests == []


class FakeBroadcast:
    """`handle.broadcast("check_health").results_async(...)`: each replica's result, or its exception."""

    def __init__(self, rounds: list[list[object]]) -> None:
        self.rounds = rounds

    def __call__(self, method: str) -> "FakeBroadcast":
        assert method == "check_health"
        return self

    async def results_async(self, timeout_s: float, return_exceptions: bool) -> list[object]:
        assert return_exceptions
        return self.rounds.pop(0) if len(self.rounds) > 1 else self.rounds[0]


def test_health_follows_the_replicas(llama_dir, monkeypatch):
    """/health and admission read `errored`: set while no replica passes its health check, cleared when one does."""
    from pagedserve.entrypoints.ray_serve import remote_engine as module

    monkeypatch.setattr(module, "HEALTH_INTERVAL_S", 0.0)
    dead, down = ActorDiedError(), RuntimeError("the engine is not running: restarting")
    engine = remote_engine(llama_dir, [])

    def check(results: list[object]) -> str | None:
        engine.handle.broadcast = FakeBroadcast([results])
        return asyncio.run(engine.replicas_down())

    assert check([None, dead]) is None  # one replica is enough
    assert "no replica is running" in check([dead, down])
    assert "no replica is running" in check([])

    async def watch(results: list[object]) -> str | None:
        engine.handle.broadcast = FakeBroadcast([results])
        task = asyncio.create_task(engine.watch_replicas())
        await asyncio.sleep(0.05)
        task.cancel()
        return engine.errored

    assert "no replica is running" in asyncio.run(watch([dead, dead]))
    with pytest.raises(module.EngineDeadError):  # what the server answers with a 503
        admit(engine, [5, 6], "req-2")
    assert asyncio.run(watch([dead, None])) is None  # Ray Serve restarted one


# ---- `pagedserve serve --num-replicas 2`: a local Ray, two replicas ----------------------------------------

MAX_MODEL_LEN = 256
SESSIONS, TURNS = 8, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: str

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-30:])

    def running(self) -> bool:
        """The application runs (the server logs it once `serve.run` has returned)."""
        with open(self.log_path, errors="replace") as f:
            return "replicas on Ray at" in f.read()


@pytest.fixture(scope="module")
def cluster(llama_dir, tmp_path_factory) -> Iterator[Server]:
    """The CLI on its own local Ray (half a CPU a replica: two replicas and the ingress fit in two CPUs); this
    process joins that Ray to kill a replica and read Serve's status."""
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("ray_serve") / "server.log")
    command = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", llama_dir, "--num-replicas", "2",
               "--replica-cpus", "0.5", "--port", str(port), "--served-model-name", "tiny", "--dtype", "float32",
               "--max-model-len", "1024", "--num-kv-blocks", "512", "--max-num-seqs", "16",
               "--engine-placement", "thread", "--shutdown-timeout", "20"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + 240
        while not (server.running() and _healthy(server.url)):
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{server.log_tail()}"
            assert time.monotonic() < deadline, f"the server was not ready in 240 s:\n{server.log_tail()}"
            time.sleep(1)
        # the Ray started last on this machine: the server's (its address alone is refused without the
        # session's auth token, which "auto" finds)
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
        yield server
    finally:
        ray.shutdown()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the drain test did not stop it
            process.wait(30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def offline(llama_dir):
    return LLM(llama_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=128)


async def chat(client: httpx.AsyncClient, base: str, messages: list[dict], session: str) -> httpx.Response:
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True,
            "session_id": session, "return_token_ids": True}
    return await client.post(f"{base}/v1/chat/completions", json=body)


async def run_sessions(base: str) -> dict[str, list[httpx.Response]]:
    """SESSIONS concurrent sessions of TURNS turns; each turn's reply joins its history."""
    async with httpx.AsyncClient(timeout=120) as client:

        async def session(s: int) -> list[httpx.Response]:
            messages, responses = [{"role": "user", "content": f"Session {s}: the quick brown fox {s * 7}"}], []
            for turn in range(TURNS):
                response = await chat(client, base, messages, f"session-{s}")
                assert response.status_code == 200, response.text
                responses.append(response)
                messages += [{"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]},
                             {"role": "user", "content": f"and turn {turn} of {s}"}]
            return responses

        results = await asyncio.gather(*(session(s) for s in range(SESSIONS)))
    return {f"session-{s}": r for s, r in enumerate(results)}


def test_sessions_stay_on_one_replica_and_outputs_equal_one_engines(cluster, offline):
    runs = asyncio.run(run_sessions(cluster.url))
    replicas_used = set()
    for session, responses in runs.items():
        served = {r.headers["x-pagedserve-replica"] for r in responses}
        assert len(served) == 1, f"{session} moved between replicas: {served}"
        replicas_used |= served
    assert len(replicas_used) == 2  # concurrent first turns: two-choices on queue length spreads them
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for responses in runs.values():
        for response in responses:
            choice = response.json()["choices"][0]
            expected = offline.generate({"prompt_token_ids": choice["prompt_token_ids"]}, greedy, use_tqdm=False)
            assert choice["token_ids"] == expected[0].outputs[0].token_ids


def test_same_routes_auth_free_health_and_metrics_of_every_replica(cluster):
    url = cluster.url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny"
    bad = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10_000})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    assert httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    metrics = httpx.get(f"{url}/metrics").text
    replicas = {line.split('replica="')[1].split('"')[0] for line in metrics.splitlines()
                if line.startswith("vllm:prompt_tokens_total")}
    assert len(replicas) == 2
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "The quick brown fox", "max_tokens": 4, "stream": True}) as stream:
        assert stream.headers["x-pagedserve-replica"] in replicas  # known before the stream starts
        assert list(stream.iter_lines())[-2:] == ["data: [DONE]", ""]


def test_a_replica_killed_mid_run_fails_only_its_streams_and_the_run_completes(cluster):
    url = cluster.url
    started = [asyncio.Event() for _ in range(6)]

    async def stream(client: httpx.AsyncClient, i: int) -> tuple[str, list[str]]:
        body = {"model": "tiny", "prompt": f"The quick brown fox {i}", "max_tokens": 900, "ignore_eos": True,
                "stream": True, "session_id": f"kill-{i}"}
        lines = []
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line:
                    lines.append(line)
                    started[i].set()
        return response.headers.get("x-pagedserve-replica", ""), lines

    async def scenario() -> tuple[str, list[tuple[str, list[str]]], list[int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            name, actor = replica_actors()[0]  # looked up first: the kill must land while the streams run
            tasks = [asyncio.create_task(stream(client, i)) for i in range(6)]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60)
            ray.kill(actor, no_restart=True)  # as `kill -9` would, with every stream under way
            victim = name.rsplit("#", 1)[-1]
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)  # nothing hangs
            after = [(await chat(client, url, [{"role": "user", "content": f"again {i}"}], f"kill-{i}"))
                     .status_code for i in range(6)]
        return victim, results, after

    victim, results, after = asyncio.run(scenario())
    on_victim = [lines for replica, lines in results if replica == victim]
    on_other = [lines for replica, lines in results if replica != victim]
    assert on_victim and on_other  # six sessions over two replicas
    for _, lines in results:
        assert lines[-1] == "data: [DONE]"
    failed = [lines for lines in on_victim if '"error"' in lines[-2]]
    assert failed  # killed mid-stream: a clear final error event, then [DONE]
    assert all("the replica serving this request died" in lines[-2] for lines in failed)
    for lines in on_other:  # untouched: every token
        assert not any('"error"' in line for line in lines) and '"finish_reason": "length"' in lines[-2]
    assert after == [200] * 6  # its sessions re-routed
    wait_for_replacement(victim, timeout_s=120)


def replica_actors() -> list[tuple[str, object]]:
    """The engine replicas' actors (their names end with the replica id), by name."""
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"])
    return [(name, ray.get_actor(name, namespace="serve")) for name in names]


def wait_for_replacement(victim: str, timeout_s: float) -> None:
    """Ray Serve starts a new replica in the dead one's place."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]]
        deployment = serve.status().applications["pagedserve"].deployments["EngineReplica"]
        if (len(names) == 2 and not any(n.endswith(victim) for n in names)
                and deployment.replica_states.get("RUNNING", 0) == 2):
            return
        time.sleep(1)
    raise AssertionError(f"the killed replica was not replaced within {timeout_s} s: {serve.status()}")


def test_sigterm_drains_open_streams_then_exits_0(cluster):
    """Last in the module: it stops the server. A stream open at SIGTERM gets every token."""
    ray.shutdown()  # this process leaves the server's Ray before it goes
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        cluster.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert first.startswith("data: {") and rest[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in rest[-2]
    assert cluster.process.wait(120) == 0, cluster.log_tail()
