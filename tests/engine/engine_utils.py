"""Helpers for engine tests: build an EngineCore, run it dry, check that no KV block leaked; step a scheduler
with a pretend model."""

from dataclasses import dataclass, field

from pagedserve.config import EngineArgs, create_engine_config
from pagedserve.engine.engine_core import EngineCore
from pagedserve.engine.protocol import EngineCoreOutput
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.scheduler import Scheduler


def make_engine(path: str, **kwargs) -> EngineCore:
    kwargs = {"dtype": "float32", "max_model_len": 256, "num_kv_blocks": 64, **kwargs}
    return EngineCore(create_engine_config(EngineArgs(path, **kwargs)))


@dataclass
class Run:
    tokens: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (request id, index) -> tokens
    finals: dict[tuple[str, int], EngineCoreOutput] = field(default_factory=dict)  # last output of each sample
    firsts: dict[tuple[str, int], EngineCoreOutput] = field(default_factory=dict)  # first output of each sample
    peak_blocks_used: int = 0  # most blocks held after any step

    def add(self, out: EngineCoreOutput) -> None:
        key = (out.request_id, out.index)
        self.tokens.setdefault(key, []).extend(out.new_token_ids)
        self.firsts.setdefault(key, out)
        if out.finished:
            assert key not in self.finals, f"{key} finished twice"
            self.finals[key] = out


def run_all(engine: EngineCore, run: Run | None = None, max_steps: int = 2000, leases: bool = False) -> Run:
    """Step until every request is done; then no block may be held, but by session leases if `leases`."""
    run = run or Run()
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            run.add(out)
        stats = engine.stats()
        run.peak_blocks_used = max(run.peak_blocks_used, stats.num_kv_blocks_total - stats.num_kv_blocks_free)
    assert not engine.has_unfinished_requests(), "the engine made no progress"
    if not leases:
        assert_all_blocks_free(engine)
    return run


def assert_all_blocks_free(engine: EngineCore) -> None:
    pool = engine.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks, f"{pool.num_blocks - pool.num_free_blocks} KV blocks leaked"
    assert all(block.ref_cnt == 0 for block in pool.blocks)
    kv = engine.kv_cache_manager
    assert not engine.requests and not kv.req_blocks and not kv.req_block_hashes and not kv.req_num_cached_blocks


def pretend_step(sched: Scheduler, token_id: int = 7) -> dict[str, int]:
    """Pretend the model ran the scheduled step (the scheduler counted its tokens as computed): where a chunk
    reached the end, the sampled token arrives (finishing at max_tokens). Returns request id -> tokens scheduled."""
    out = sched.schedule()
    for req_id in out.num_scheduled_tokens:
        request = sched.requests[req_id]
        if request.num_output_placeholders:
            receive_token(request, token_id)
            if request.num_output_tokens >= request.max_output_tokens:
                sched.finish(request, RequestStatus.FINISHED_LENGTH)
    return dict(out.num_scheduled_tokens)


def receive_token(request: Request, token_id: int) -> None:
    """What the engine core does with a sampled token: it replaces the request's oldest placeholder."""
    request.num_output_placeholders -= 1
    request.output_token_ids.append(token_id)
