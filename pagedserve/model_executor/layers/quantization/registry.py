"""The quantization methods by vLLM's names: the one list of them. The engine config validates a requested method
against it without importing the methods (their kernels, the layers); the loader makes the method's
`QuantizationConfig` from the checkpoint with the class named here (`config_class`), imported when it is used."""

import importlib
from typing import TYPE_CHECKING, cast

from pagedserve.model_executor import checkpoint_quantization

if TYPE_CHECKING:
    from pagedserve.model_executor.layers.quantization.config import QuantizationConfig

QUANTIZATION_METHODS: dict[str, str] = {  # name -> its QuantizationConfig, "module:class" in this package
    "gguf": "gguf:GGUFConfig",  # compute on a GGUF file's blocks
    "int8": "int_linear:IntConfig",  # quantize a float checkpoint at load
    "int4": "int_linear:IntConfig",
    # the checkpoint's own 4-bit weights (its config.json's quantization_config), in the formats its parser reads
    **dict.fromkeys(checkpoint_quantization.METHODS, "gptq_awq:CheckpointInt4Config"),
}


def config_class(method: str | None) -> type["QuantizationConfig"]:
    """The config class of `method` (one of QUANTIZATION_METHODS); None, no quantization: the base class."""
    module, name = QUANTIZATION_METHODS[method].split(":") if method else ("config", "QuantizationConfig")
    return cast(type["QuantizationConfig"], getattr(importlib.import_module(f"{__package__}.{module}"), name))
