"""What the engine core runs its steps on: an `Executor`, either the `ModelRunner` of this process (one rank) or a
`TensorParallelExecutor` that drives every rank. The engine core knows it only through this interface."""

from typing import Protocol

from pagedserve.model_executor.step import ModelRunnerOutput, SchedulerOutput


class WorkerFailed(RuntimeError):
    """The ranks are out of step (a worker died, or failed where rank 0 did not): the engine cannot go on."""


class KVVariants(Protocol):
    """What the engine core asks of the model itself."""

    def kv_variant(self, prompt_len: int) -> tuple:
        """What besides the tokens decides a request's K/V (a prefix-cache key), e.g. LongRoPE's factors."""
        ...


class Executor(Protocol):
    @property
    def num_kv_blocks(self) -> int:
        """The KV cache's size in blocks (the same on every rank)."""
        ...

    @property
    def model(self) -> KVVariants: ...

    def update_states(self, sched: SchedulerOutput) -> None:
        """Apply the step's per-request diffs (new, finished, preempted requests; block tables)."""
        ...

    def execute(self, sched: SchedulerOutput, req_ids: list[str]) -> ModelRunnerOutput:
        """Run the step for `req_ids` (all of its requests, or a subset when the engine core retries a failed step);
        `WorkerFailed` when the ranks are out of step."""
        ...

    def close(self) -> None:
        """Release what outlives the executor (tensor-parallel workers)."""
        ...
