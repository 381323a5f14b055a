"""Which method each layer is built with.

A `QuantizationConfig` is made from the checkpoint before the model is built (`from_checkpoint`, the class found
by name in `pagedserve/checkpoint_quantization.QUANTIZATION_METHODS`) and handed down to every layer with the
layer's name (vLLM's `quant_config` and `prefix`); each layer asks it for its method once, in its constructor.
This base class is no quantization: every layer holds float weights.
"""

from collections.abc import Iterator
from typing import Protocol

from transformers import PretrainedConfig

from pagedserve.model_executor.layers.quantization.base import (
    EmbeddingMethod,
    ExpertsLayer,
    ExpertsMethod,
    LinearMethod,
    QuantizableLayer,
    WeightItem,
)
from pagedserve.model_executor.layers.quantization.unquantized import (
    UnquantizedEmbeddingMethod,
    UnquantizedExpertsMethod,
    UnquantizedLinearMethod,
)

Weights = Iterator[tuple[str, WeightItem]]


class Checkpoint(Protocol):
    """What a config may read of the checkpoint before the model is built (the loader's view of it)."""

    hf_config: PretrainedConfig

    def tensor_names(self) -> list[str]:
        """The checkpoint's tensor names as the model's loader sees them (after the model's `map_checkpoint`)."""

    def gguf_tensor_types(self) -> dict[str, int]:
        """The ggml type of each tensor of a GGUF file, by Hugging Face name."""

    def target(self, name: str) -> tuple[str, int | None, int | None]:
        """Checkpoint tensor name -> (the model's parameter name, expert index, shard index in the fused layer)."""


class QuantizationConfig:
    """No quantization: float weights everywhere (also what a layer built without a config gets)."""

    @classmethod
    def from_checkpoint(cls, method: str, checkpoint: Checkpoint) -> "QuantizationConfig":
        return cls()

    def linear_method(self, layer: QuantizableLayer, prefix: str) -> LinearMethod:
        """A projection's method (`prefix`: the layer's module name in the model)."""
        return UnquantizedLinearMethod()

    def logits_method(self, layer: QuantizableLayer, prefix: str) -> LinearMethod:
        """The method of a layer whose outputs are logits: the output head (not tied to the embedding) and the MoE
        routers, which quantization at load leaves float, as vLLM does."""
        return self.linear_method(layer, prefix)

    def embedding_method(self, layer: QuantizableLayer, prefix: str) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()

    def experts_method(self, layer: ExpertsLayer, prefix: str) -> ExpertsMethod:
        return UnquantizedExpertsMethod()

    def check_built(self, model_name: str) -> None:
        """Called once the model is built: whatever the checkpoint quantizes found its layer (a ValueError if
        not); logs what runs quantized."""

    def quantized_tensor_names(self) -> set[str]:
        """Checkpoint tensors to be read in their quantized format (a GGUF file's blocks) rather than as floats."""
        return set()

    def convert_weights(self, weights: Weights) -> Weights:
        """The checkpoint's tensors as the layers' methods load them (GPTQ / AWQ tensors -> int4 rows)."""
        return weights
