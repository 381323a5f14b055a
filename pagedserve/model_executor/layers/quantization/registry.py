"""From a quantization method's name (pagedserve/checkpoint_quantization.QUANTIZATION_METHODS, the one list, which
the engine config validates against without importing the methods) to its `QuantizationConfig` class, imported
when it is used: the loader makes the method's config from the checkpoint with it."""

import importlib
from typing import TYPE_CHECKING, cast

from pagedserve.checkpoint_quantization import QUANTIZATION_METHODS

if TYPE_CHECKING:
    from pagedserve.model_executor.layers.quantization.config import QuantizationConfig


def config_class(method: str | None) -> type["QuantizationConfig"]:
    """The config class of `method` (one of QUANTIZATION_METHODS); None, no quantization: the base class."""
    module, name = QUANTIZATION_METHODS[method].split(":") if method else ("config", "QuantizationConfig")
    return cast(type["QuantizationConfig"], getattr(importlib.import_module(f"{__package__}.{module}"), name))
