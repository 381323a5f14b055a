"""What a quantization method is, and what it may ask of the layer it serves (vLLM's `quant_method`).

Every linear layer, embedding and MoE experts layer is built with its method, which
- `create_weights(layer)` registers the tensors the layer holds in the method's format (a float weight, a GGUF
  file's blocks, int4 buffers for a GPTQ / AWQ checkpoint);
- `load_weight(layer, item, shard)` copies one checkpoint item (a float tensor, GGUF blocks, int4 rows) into the
  rows of fused part `shard` (the layer knows its parts' sizes: `local_sizes`);
- `process_weights_after_loading(layer)` turns what was loaded into what the kernels read (int8 / int4
  quantization at load, packing for oneDNN);
- `apply(layer, x)` (`embedding(layer, ids)`, `expert_forward(layer, expert, x)`) computes with it.

The methods never import the layers: they see them through the Protocols below, so the layer files import the
method files and not the other way round. A method object belongs to one layer and may keep per-layer state.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.model_executor.gguf_weights import QuantizedTensor


@dataclass
class Int4Rows:
    """One projection of a GPTQ / AWQ checkpoint in the int4 kernels' layout (row n = output feature n)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


WeightItem = torch.Tensor | QuantizedTensor | Int4Rows  # what a checkpoint hands a layer's weight loader


class QuantizableLayer(Protocol):
    """A linear layer (or embedding, `in_features` its width and `out_features` its rows) as its method sees it."""

    in_features: int
    out_features: int
    local_sizes: list[int]  # the rows of each fused part this rank holds, in shard order ([out_features] unfused)
    silu_gate_up: bool  # a fused gate/up projection whose output is only ever used as silu(gate) * up

    @property
    def bias(self) -> torch.Tensor | None: ...

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None: ...

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None: ...

    def __getattr__(self, name: str) -> Any:
        """The tensors its method registered (`weight`, `blocks`, ...)."""


class ExpertsLayer(Protocol):
    """An MoE experts layer as its method sees it: `num_experts` SwiGLU MLPs (held by this rank)."""

    num_experts: int
    hidden_size: int
    intermediate_size: int

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None: ...

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None: ...

    def __getattr__(self, name: str) -> Any:
        """The tensors its method registered."""


def empty_parameter(*shape: int) -> nn.Parameter:
    """A float parameter of the model's dtype and device (the defaults while the model is built), to be loaded."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def copy_rows(dest: torch.Tensor, tensor: torch.Tensor, sizes: Sequence[int], shard: int | None) -> None:
    """Copy `tensor` into `dest`, or into the rows of part `shard` of it (`sizes`: the rows of each part)."""
    if shard is not None:
        offset = sum(sizes[:shard])
        dest = dest[offset : offset + sizes[shard]]
    if dest.shape != tensor.shape:
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != model {tuple(dest.shape)}")
    dest.copy_(tensor)


def float_tensor(item: WeightItem) -> torch.Tensor:
    """`item` as a float tensor, for a layer that holds its weight in float."""
    if not isinstance(item, torch.Tensor):
        raise ValueError(f"a {type(item).__name__} for a layer whose weight is float (it has no quantized layer of "
                         "its type)")
    return item


class LinearMethod(ABC):
    """How a linear layer holds and multiplies its weight."""

    @abstractmethod
    def create_weights(self, layer: QuantizableLayer) -> None: ...

    @abstractmethod
    def load_weight(self, layer: QuantizableLayer, item: WeightItem, shard: int | None) -> None: ...

    def process_weights_after_loading(self, layer: QuantizableLayer) -> None:  # noqa: B027 (a hook)
        """Nothing to do by default: the kernels read what was loaded."""

    @abstractmethod
    def apply(self, layer: QuantizableLayer, x: torch.Tensor) -> torch.Tensor:
        """x [.., K] @ W^T + bias -> [.., N]."""

    def silu_and_mul(self, layer: QuantizableLayer, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a fused gate/up projection."""
        gate, up = self.apply(layer, x).split(layer.out_features // 2, dim=-1)
        return F.silu(gate) * up


class KernelLinearMethod(LinearMethod):
    """A method whose kernel multiplies rows: the [.., K] -> [.., N] reshape and the bias are the same for all."""

    @abstractmethod
    def matmul(self, layer: QuantizableLayer, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, K] @ W^T -> [M, N] in rows' dtype."""

    def apply(self, layer: QuantizableLayer, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(layer, x.reshape(-1, layer.in_features))
        if layer.bias is not None:
            out += layer.bias
        return out.view(*x.shape[:-1], layer.out_features)


class EmbeddingMethod(ABC):
    """How an embedding table holds its rows (`out_features` rows of `in_features`) and looks them up."""

    @abstractmethod
    def create_weights(self, layer: QuantizableLayer) -> None: ...

    @abstractmethod
    def load_weight(self, layer: QuantizableLayer, item: WeightItem, shard: int | None) -> None: ...

    @abstractmethod
    def embedding(self, layer: QuantizableLayer, ids: torch.Tensor) -> torch.Tensor:
        """The rows of `ids` (ids in 0..out_features): [*ids.shape, in_features]."""

    @abstractmethod
    def tied_head_method(self) -> LinearMethod:
        """The method of an output head that shares this table's tensors (`tie_word_embeddings`)."""


class ExpertsMethod(ABC):
    """How an MoE experts layer holds its experts' gate/up ([2 I, H] each) and down ([H, I]) weights."""

    @abstractmethod
    def create_weights(self, layer: ExpertsLayer) -> None: ...

    @abstractmethod
    def load_weight(self, layer: ExpertsLayer, param: str, item: WeightItem, expert: int | None,
                    shard: int | None) -> None:
        """`param` "gate_up_proj" or "down_proj"; one expert's (or, `expert` None, all experts' fused) tensor."""

    def process_weights_after_loading(self, layer: ExpertsLayer) -> None:  # noqa: B027 (a hook)
        """Nothing to do by default."""

    @abstractmethod
    def expert_forward(self, layer: ExpertsLayer, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `expert`'s SwiGLU MLP on the rows routed to it."""
