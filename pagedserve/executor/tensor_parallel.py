"""Tensor parallelism's executor: rank 0's `ModelRunner` in the engine process, plus one worker per other rank
(a process, or a Ray actor) that runs the same steps on its shard of the weights and of the KV cache.

Every rank applies the same `SchedulerOutput` diffs and runs the same forward, so the collectives inside the model
(layers/parallel.py) meet. Rank 0 alone samples, and broadcasts the sampled ids, which the workers append to their
persistent batches. The scheduler, the block accounting and the grammar state stay with rank 0's engine core: to
it, this is an `Executor` like a `ModelRunner`.

Failures: a fault caused by a step's data strikes every rank at the same point (they run the same code on the same
inputs), so each raises, and the engine core retries the step without the request at fault as with one rank. A
fault on some ranks only, or a worker that died, leaves the ranks out of step: `WorkerFailed`, which ends the
engine (the server then restarts it). A rank stuck in a collective fails it after `COLLECTIVE_TIMEOUT`.
"""

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection
from typing import Any, Protocol

import torch

from pagedserve.config import EngineConfig
from pagedserve.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel, tp_size
from pagedserve.executor.base import WorkerFailed
from pagedserve.local_ray import init_ray
from pagedserve.model_executor.model_runner import ModelRunner
from pagedserve.model_executor.step import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("pagedserve")


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """Each rank's own device: cuda:<rank> on GPUs (one per rank), the CPU otherwise."""
    if config.device.type == "cuda":
        return dataclasses.replace(config, device=torch.device("cuda", rank))
    return config


def threads_per_rank(world_size: int) -> int:
    """The CPU's cores shared out between the ranks, so they do not contend for them."""
    return max(1, (os.cpu_count() or 1) // world_size)


class Worker:
    """A rank: joins the group, loads its shard, and (ranks > 0) runs what rank 0 sends, the same calls as a
    ModelRunner. `config` carries the rank's own device. Rank 0 keeps only its `runner`."""

    def __init__(self, config: EngineConfig, rank: int, init_method: str, backend: str) -> None:
        if config.device.type == "cpu":
            torch.set_num_threads(threads_per_rank(config.tensor_parallel_size))
        init_tensor_parallel(rank, config.tensor_parallel_size, init_method, backend)
        self.runner = ModelRunner(config)

    def ready(self) -> None:
        """Nothing: a call that returns once the worker is built."""

    def update_states(self, sched: SchedulerOutput) -> None:
        self.runner.update_states(sched)

    def execute(self, sched: SchedulerOutput, req_ids: list[str]) -> None:
        self.runner.execute(sched, req_ids)

    def close(self) -> None:
        destroy_tensor_parallel()


class WorkerHandle(Protocol):
    """Rank 0's end of a worker: calls go out in order; `wait` takes the replies of those not yet waited for."""

    def call(self, method: str, *args: Any) -> None: ...

    def wait(self) -> list[str]:
        """The errors of the calls since the last wait (empty when all went well); WorkerFailed if it is gone."""
        ...

    def stop(self) -> None: ...


class ProcessWorker:
    """A worker in a process of its own (`distributed_executor_backend="mp"`), started with `python -m` (the engine
    process is a daemon, which multiprocessing does not let have children) and driven over a private socket pair.
    It stops when its parent goes."""

    def __init__(self, config: EngineConfig, rank: int, init_method: str, backend: str) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pagedserve.executor.worker_process", str(theirs.fileno()),
                 str(logging.getLogger("pagedserve").getEffectiveLevel())],
                pass_fds=(theirs.fileno(),),
            )
        self.conn = Connection(ours.detach())
        self.conn.send((rank_config(config, rank), rank, init_method, backend))
        self.rank = rank
        self.pending = 1  # its reply once its shard is loaded

    def call(self, method: str, *args: Any) -> None:
        try:
            self.conn.send((method, args))
        except OSError as e:
            raise WorkerFailed(f"tensor-parallel worker {self.rank} is gone: {e}") from e
        self.pending += 1

    def wait(self) -> list[str]:
        errors = []
        while self.pending:
            try:
                error = self.conn.recv()
            except (EOFError, OSError) as e:
                raise WorkerFailed(f"tensor-parallel worker {self.rank} died (exit status "
                                   f"{self.process.poll()})") from e
            self.pending -= 1
            if error is not None:
                errors.append(error)
        return errors

    def stop(self) -> None:
        try:
            self.conn.send(("close", ()))
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.conn.close()


class RayWorker:
    """A worker as a Ray actor (`distributed_executor_backend="ray"`), on the engine's own node (the group's
    rendezvous is rank 0's address)."""

    def __init__(self, config: EngineConfig, rank: int, init_method: str, backend: str) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray = ray
        num_gpus = 1 if config.device.type == "cuda" else 0
        actor_class = ray.remote(num_cpus=0 if num_gpus else 1, num_gpus=num_gpus)(_RayActor)
        strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        if num_gpus:  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU: it is cuda:0 there
            config = dataclasses.replace(config, device=torch.device("cuda", 0))
        self.actor: Any = actor_class.options(scheduling_strategy=strategy).remote(config, rank, init_method, backend)
        self.rank = rank
        self.pending: list[Any] = []  # ObjectRefs of the calls not yet waited for
        self.call("ready")

    def call(self, method: str, *args: Any) -> None:
        self.pending.append(getattr(self.actor, method).remote(*args))

    def wait(self) -> list[str]:
        errors = []
        for ref in self.pending:
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:
                self.pending = []
                raise WorkerFailed(f"tensor-parallel worker {self.rank} (Ray actor) died: {e}") from e
            except self.ray.exceptions.RayTaskError as e:
                errors.append(str(e.cause) if e.cause is not None else str(e))
        self.pending = []
        return errors

    def stop(self) -> None:
        try:
            self.ray.get(self.actor.close.remote(), timeout=10)
        except Exception:  # gone already, or stuck: it is killed either way
            pass
        self.ray.kill(self.actor)


class _RayActor(Worker):
    """The Worker as Ray runs it: a failed call is an exception Ray carries back."""

    def __init__(self, config: EngineConfig, rank: int, init_method: str, backend: str) -> None:
        logging.basicConfig(level=logging.WARNING)
        super().__init__(config, rank, init_method, backend)


def _free_address(host: str) -> str:
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


class TensorParallelExecutor:
    """What the engine core holds instead of a ModelRunner when tensor_parallel_size > 1."""

    def __init__(self, config: EngineConfig) -> None:
        if tp_size() > 1:  # the group is the process's; leaving it on failure would break the engine that holds it
            raise ValueError("this process already holds a tensor-parallel engine (one tensor-parallel engine per "
                             "process); shut it down first")
        world_size = config.tensor_parallel_size
        backend = "nccl" if config.device.type == "cuda" else "gloo"
        make_worker: type[ProcessWorker] | type[RayWorker] = ProcessWorker
        if config.distributed_executor_backend == "ray":
            import ray

            if not ray.is_initialized():
                init_ray()  # a local instance: loopback only, no dashboard
            make_worker = RayWorker
        init_method = _free_address("127.0.0.1")  # every rank is on this node (the Ray actors are pinned to it)
        logger.info("tensor parallel: %d ranks (%s workers, %s)", world_size, config.distributed_executor_backend,
                    backend)
        self.workers: list[WorkerHandle] = []
        try:
            for rank in range(1, world_size):
                self.workers.append(make_worker(config, rank, init_method, backend))
            self.driver = Worker(rank_config(config, 0), 0, init_method, backend).runner  # rank 0, in this process
            self._check(self._wait())
        except BaseException:
            self._stop()
            raise
        self._finalizer = weakref.finalize(self, TensorParallelExecutor._shut_down, list(self.workers))

    @property
    def model(self) -> Any:
        return self.driver.model

    @property
    def num_kv_blocks(self) -> int:
        return self.driver.num_kv_blocks

    def update_states(self, sched: SchedulerOutput) -> None:
        shared = _for_workers(sched)
        for worker in self.workers:
            worker.call("update_states", shared)
        self.driver.update_states(sched)

    def execute(self, sched: SchedulerOutput, req_ids: list[str]) -> ModelRunnerOutput:
        shared = _for_workers(sched)
        for worker in self.workers:
            worker.call("execute", shared, req_ids)
        try:
            out = self.driver.execute(sched, req_ids)
        except Exception as e:  # the step's data: every worker must have failed as well
            if any(not errors for errors in self._wait()):
                raise WorkerFailed(f"rank 0 failed a step its workers ran: {type(e).__name__}: {e}") from e
            raise
        self._check(self._wait())
        return out

    def close(self) -> None:
        self._finalizer.detach()
        self._stop()

    def _wait(self) -> list[list[str]]:
        return [worker.wait() for worker in self.workers]

    def _check(self, errors: list[list[str]]) -> None:
        for rank, worker_errors in enumerate(errors, start=1):
            if worker_errors:
                raise WorkerFailed(f"tensor-parallel worker {rank} failed: {worker_errors[0]}")

    def _stop(self) -> None:
        TensorParallelExecutor._shut_down(self.workers)
        self.workers = []

    @staticmethod
    def _shut_down(workers: list[WorkerHandle]) -> None:
        """Stop the workers and leave the group (also when the executor is collected unclosed, or at exit)."""
        for worker in workers:
            worker.stop()
        destroy_tensor_parallel()


def _for_workers(sched: SchedulerOutput) -> SchedulerOutput:
    """The step as the workers need it: they do not sample, so not the grammar bitmask (a live object of rank 0's)
    nor the banned ids."""
    if sched.grammar_bitmask is None and not sched.banned_token_ids:
        return sched
    return dataclasses.replace(sched, grammar_bitmask=None, banned_token_ids={})
