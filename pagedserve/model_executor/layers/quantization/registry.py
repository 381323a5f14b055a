"""The quantization methods by vLLM's names: the one list of them. The engine config validates a requested
method against it; the loader makes the method's `QuantizationConfig` from the checkpoint with the class found
here (None: no quantization, the base class)."""

from pagedserve.model_executor import checkpoint_quantization
from pagedserve.model_executor.layers.quantization.config import QuantizationConfig
from pagedserve.model_executor.layers.quantization.gguf import GGUFConfig
from pagedserve.model_executor.layers.quantization.gptq_awq import CheckpointInt4Config
from pagedserve.model_executor.layers.quantization.int_linear import IntConfig

QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {
    "gguf": GGUFConfig,  # compute on a GGUF file's blocks
    "int8": IntConfig,  # quantize a float checkpoint at load
    "int4": IntConfig,
    # the checkpoint's own 4-bit weights (its config.json's quantization_config): the formats its parser reads
    **dict.fromkeys(checkpoint_quantization.METHODS, CheckpointInt4Config),
}


def config_class(method: str | None) -> type[QuantizationConfig]:
    return QuantizationConfig if method is None else QUANTIZATION_METHODS[method]
