"""Integer weights for linear layers and MoE experts: int8 per output channel, int4 in groups along K.

`quantization="int8" | "int4"` (`IntConfig`) builds every projection with a method that loads its float weight as
an unquantized layer would and quantizes it after loading (`QuantizeAtLoad`); GPTQ / AWQ checkpoints
(`gptq_awq.CheckpointInt4Config`) build it with empty int4 buffers that the checkpoint's rows fill
(`Int4CheckpointMethod`; a fused q/k/v or gate/up layer is its parts' rows one after another, in every buffer).
MoE experts hold the same tensors stacked per expert. The matmuls are `int_quant`'s.
"""

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pagedserve.model_executor.layers.quantization import int_quant
from pagedserve.model_executor.layers.quantization.base import (
    ExpertsLayer,
    ExpertsMethod,
    Int4Rows,
    KernelLinearMethod,
    LinearMethod,
    QuantizableLayer,
    WeightItem,
    copy_rows,
    empty_parameter,
    float_tensor,
)
from pagedserve.model_executor.layers.quantization.config import Checkpoint, QuantizationConfig
from pagedserve.model_executor.layers.quantization.unquantized import (
    UnquantizedExpertsMethod,
    UnquantizedLinearMethod,
)

logger = logging.getLogger("pagedserve")

INT4_GROUP_SIZE = 128


class IntFormat(ABC):
    """One integer format: the tensors a weight [N, K] becomes, and the matmul that reads them."""

    names: tuple[str, ...]  # the tensors, in the order `matmul` takes them

    @abstractmethod
    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    @abstractmethod
    def matmul(self, rows: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """rows [M, K] @ W^T -> [M, N] in rows' dtype."""


class Int8Format(IntFormat):
    """w = qweight * scales[n]: int8 [N, K], one float32 scale per output channel."""

    names = ("qweight", "scales")

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return int_quant.quantize_int8(weight)

    def matmul(self, rows: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        qweight, scales = tensors
        return int_quant.matmul_int8(rows, qweight, scales)


class Int4Format(IntFormat):
    """w = (q - zeros[n, g]) * scales[n, g] over groups of `group_size` weights along K; q packed by
    `int_quant.pack_int4` (whole rows), scales float32 and zeros uint8 [N, K / group_size]."""

    names = ("packed", "scales", "zeros")

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return int_quant.quantize_int4(weight, self.group_size)

    def empty(self, n: int, k: int, *experts: int) -> tuple[torch.Tensor, ...]:
        """Empty tensors for a weight [N, K] (of each of `experts` experts), for a checkpoint's rows to fill."""
        if self.group_size % 32 or k % self.group_size:
            raise ValueError(f"int4 group size {self.group_size} must be a multiple of 32 dividing in_features {k}")
        groups = k // self.group_size
        return (torch.empty(*experts, n, 32 * -(-k // 64), dtype=torch.uint8),
                torch.empty(*experts, n, groups, dtype=torch.float32),
                torch.empty(*experts, n, groups, dtype=torch.uint8))

    def matmul(self, rows: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        packed, scales, zeros = tensors
        return int_quant.matmul_int4(rows, packed, scales, zeros, self.group_size)


def int4_group_size(in_features: int) -> int | None:
    """128, or for narrower layers the largest multiple of 32 dividing K; None when K is no multiple of 32."""
    if in_features % INT4_GROUP_SIZE == 0:
        return INT4_GROUP_SIZE
    return next((g for g in range(INT4_GROUP_SIZE - 32, 0, -32) if in_features % g == 0), None)


def _int4_rows(item: WeightItem) -> tuple[torch.Tensor, ...]:
    if not isinstance(item, Int4Rows):
        raise ValueError(f"a {type(item).__name__} for an int4 layer (its checkpoint tensors are qweight, qzeros, "
                         "scales)")
    return item.packed, item.scales, item.zeros


class QuantizeAtLoad(KernelLinearMethod):
    """int8 / int4 quantized at load: the float `weight` is loaded, then quantized into `format`'s tensors."""

    def __init__(self, format: IntFormat) -> None:
        self.format = format

    def create_weights(self, layer: QuantizableLayer) -> None:
        layer.register_parameter("weight", empty_parameter(layer.out_features, layer.in_features))

    def load_weight(self, layer: QuantizableLayer, item: WeightItem, shard: int | None) -> None:
        copy_rows(layer.weight, float_tensor(item), layer.local_sizes, shard)

    def process_weights_after_loading(self, layer: QuantizableLayer) -> None:
        for name, tensor in zip(self.format.names, self.format.quantize(layer.weight.detach()), strict=True):
            layer.register_buffer(name, tensor)
        layer.register_parameter("weight", None)

    def matmul(self, layer: QuantizableLayer, rows: torch.Tensor) -> torch.Tensor:
        return self.format.matmul(rows, [getattr(layer, name) for name in self.format.names])


class Int4CheckpointMethod(KernelLinearMethod):
    """int4 buffers filled from a GPTQ / AWQ checkpoint's rows (`Int4Rows`), part by part for a fused layer."""

    def __init__(self, group_size: int) -> None:
        self.format = Int4Format(group_size)

    def create_weights(self, layer: QuantizableLayer) -> None:
        for name, tensor in zip(self.format.names, self.format.empty(layer.out_features, layer.in_features)):
            layer.register_buffer(name, tensor)

    def load_weight(self, layer: QuantizableLayer, item: WeightItem, shard: int | None) -> None:
        for name, tensor in zip(self.format.names, _int4_rows(item)):
            copy_rows(getattr(layer, name), tensor, layer.local_sizes, shard)

    def matmul(self, layer: QuantizableLayer, rows: torch.Tensor) -> torch.Tensor:
        return self.format.matmul(rows, [getattr(layer, name) for name in self.format.names])


class _IntExperts(ExpertsMethod):
    """Experts whose gate/up and down weights are in `formats` (one each): `{param}_{tensor}` stacked per expert."""

    def __init__(self, gate_up: IntFormat, down: IntFormat) -> None:
        self.formats = {"gate_up_proj": gate_up, "down_proj": down}

    def _matmul(self, layer: ExpertsLayer, param: str, expert: int, rows: torch.Tensor) -> torch.Tensor:
        format = self.formats[param]
        return format.matmul(rows, [getattr(layer, f"{param}_{name}")[expert] for name in format.names])

    def expert_forward(self, layer: ExpertsLayer, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._matmul(layer, "gate_up_proj", expert, x)
        gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
        return self._matmul(layer, "down_proj", expert, F.silu(gate) * up)


class IntExpertsAtLoad(_IntExperts):
    """int8 / int4 experts quantized at load: loaded as float experts, then each expert's weights quantized."""

    def __init__(self, gate_up: IntFormat, down: IntFormat) -> None:
        super().__init__(gate_up, down)
        self.floats = UnquantizedExpertsMethod()

    def create_weights(self, layer: ExpertsLayer) -> None:
        self.floats.create_weights(layer)

    def load_weight(self, layer: ExpertsLayer, param: str, item: WeightItem, expert: int | None,
                    shard: int | None) -> None:
        self.floats.load_weight(layer, param, item, expert, shard)

    def process_weights_after_loading(self, layer: ExpertsLayer) -> None:
        for param, format in self.formats.items():
            weights: torch.Tensor = getattr(layer, param).detach()
            per_expert = [format.quantize(weight) for weight in weights]
            for i, name in enumerate(format.names):
                layer.register_buffer(f"{param}_{name}", torch.stack([tensors[i] for tensors in per_expert]))
            layer.register_parameter(param, None)


class Int4CheckpointExperts(_IntExperts):
    """int4 experts filled from a GPTQ / AWQ checkpoint's per-expert rows."""

    def create_weights(self, layer: ExpertsLayer) -> None:
        shapes = {"gate_up_proj": (2 * layer.intermediate_size, layer.hidden_size),
                  "down_proj": (layer.hidden_size, layer.intermediate_size)}
        for param, format in self.formats.items():
            assert isinstance(format, Int4Format)
            for name, tensor in zip(format.names, format.empty(*shapes[param], layer.num_experts)):
                layer.register_buffer(f"{param}_{name}", tensor)

    def load_weight(self, layer: ExpertsLayer, param: str, item: WeightItem, expert: int | None,
                    shard: int | None) -> None:
        if expert is None:
            raise ValueError("int4 experts are loaded expert by expert")
        for name, tensor in zip(self.formats[param].names, _int4_rows(item)):
            dest = getattr(layer, f"{param}_{name}")[expert]
            copy_rows(dest, tensor, [dest.shape[0] // 2] * 2, shard)


class IntConfig(QuantizationConfig):
    """`quantization="int8" | "int4"`: every projection and MoE experts layer is quantized at load; the head and
    the MoE routers stay float (their outputs are logits: vLLM quantizes neither; embeddings and norms are no
    linears). Where no int4 group size fits a layer's width it stays float."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.quantized = self.kept_float = 0

    @classmethod
    def from_checkpoint(cls, method: str, checkpoint: Checkpoint) -> "IntConfig":
        return cls(method)

    def _format(self, in_features: int) -> IntFormat | None:
        if self.method == "int8":
            return Int8Format()
        group_size = int4_group_size(in_features)
        return None if group_size is None else Int4Format(group_size)

    def _count(self, quantized: bool) -> None:
        self.quantized += quantized
        self.kept_float += not quantized

    def linear_method(self, layer: QuantizableLayer, prefix: str) -> LinearMethod:
        format = self._format(layer.in_features)
        self._count(format is not None)
        return UnquantizedLinearMethod() if format is None else QuantizeAtLoad(format)

    def logits_method(self, layer: QuantizableLayer, prefix: str) -> LinearMethod:
        return UnquantizedLinearMethod()

    def experts_method(self, layer: ExpertsLayer, prefix: str) -> ExpertsMethod:
        gate_up, down = self._format(layer.hidden_size), self._format(layer.intermediate_size)
        self._count(gate_up is not None and down is not None)
        if gate_up is None or down is None:
            return UnquantizedExpertsMethod()
        return IntExpertsAtLoad(gate_up, down)

    def check_built(self, model_name: str) -> None:
        logger.info("%s quantization at load: %d layers quantized; %d kept float (no int4 group size fits their "
                    "width); embeddings, norms and the head stay float", self.method, self.quantized, self.kept_float)
