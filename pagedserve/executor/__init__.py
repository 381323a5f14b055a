"""The executors the engine core runs its steps on (`base.Executor`): the model runner, or tensor parallelism's."""

from pagedserve.config import EngineConfig
from pagedserve.executor.base import Executor
from pagedserve.executor.tensor_parallel import TensorParallelExecutor
from pagedserve.model_executor.model_runner import ModelRunner


def make_executor(config: EngineConfig) -> Executor:
    if config.tensor_parallel_size == 1:
        return ModelRunner(config)
    return TensorParallelExecutor(config)
