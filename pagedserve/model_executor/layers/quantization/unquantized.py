"""Float weights: the methods of every layer no quantization method claims.

A bf16 linear on the CPU is packed once for oneDNN after loading: `F.linear` in bf16 re-lays the weight out for
oneDNN's kernels on every call, and packing once saves that copy on every step (measured 1.1-1.9x faster per matmul
on this machine). A fused gate/up projection is packed as two weights, so that silu is the gate matmul's epilogue
and the multiply the up matmul's: no [tokens, 2 x intermediate] output, no silu or multiply pass (measured 2.1 ->
1.7 ms for a 1,024-token SmolLM2 MLP input).
"""

import torch
import torch.nn.functional as F

from pagedserve.model_executor.layers.quantization.base import (
    EmbeddingMethod,
    ExpertsLayer,
    ExpertsMethod,
    LinearMethod,
    QuantizableLayer,
    WeightItem,
    copy_rows,
    empty_parameter,
    float_tensor,
)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's bf16 path needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT: without them (an AVX2-only CPU) the
    reorder raises, and F.linear stays (PyTorch then converts bf16 through float32 itself)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


class UnquantizedLinearMethod(LinearMethod):
    """`weight` [out_features, in_features] in the model's dtype; packed for oneDNN after loading where it can be
    (the float weight is then let go: the packed copy is what runs)."""

    def __init__(self) -> None:
        self.packed: torch.Tensor | None = None
        # a packed gate/up: (gate weight, up weight, gate bias, up bias)
        self.packed_gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None

    def create_weights(self, layer: QuantizableLayer) -> None:
        layer.register_parameter("weight", empty_parameter(layer.out_features, layer.in_features))

    def load_weight(self, layer: QuantizableLayer, item: WeightItem, shard: int | None) -> None:
        copy_rows(layer.weight, float_tensor(item), layer.local_sizes, shard)

    def process_weights_after_loading(self, layer: QuantizableLayer) -> None:
        weight: torch.Tensor = layer.weight.detach()
        if not can_pack(weight.device, weight.dtype):
            return
        if layer.silu_gate_up:
            size = layer.out_features // 2
            bias = None if layer.bias is None else layer.bias.detach()
            self.packed_gate_up = (
                _pack(weight[:size].contiguous()),
                _pack(weight[size:].contiguous()),
                None if bias is None else bias[:size].contiguous(),
                None if bias is None else bias[size:].contiguous(),
            )
        else:
            self.packed = _pack(weight)
        layer.register_parameter("weight", None)

    def apply(self, layer: QuantizableLayer, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, layer.weight, layer.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, layer.bias, "none", [], "")

    def silu_and_mul(self, layer: QuantizableLayer, x: torch.Tensor) -> torch.Tensor:
        if self.packed_gate_up is None:
            return super().silu_and_mul(layer, x)
        gate_weight, up_weight, gate_bias, up_bias = self.packed_gate_up
        gate = torch.ops.mkldnn._linear_pointwise(x, gate_weight, gate_bias, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, up_weight, up_bias, "mul")


class UnquantizedEmbeddingMethod(EmbeddingMethod):
    """`weight` [rows, width] in the model's dtype."""

    def create_weights(self, layer: QuantizableLayer) -> None:
        layer.register_parameter("weight", empty_parameter(layer.out_features, layer.in_features))

    def load_weight(self, layer: QuantizableLayer, item: WeightItem, shard: int | None) -> None:
        copy_rows(layer.weight, float_tensor(item), layer.local_sizes, shard)

    def embedding(self, layer: QuantizableLayer, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)

    def tied_head_method(self) -> LinearMethod:
        return UnquantizedLinearMethod()


class UnquantizedExpertsMethod(ExpertsMethod):
    """3-D parameters in transformers' fused layout: `gate_up_proj` [E, 2 I, H] (gate rows, then up rows) and
    `down_proj` [E, H, I]."""

    def create_weights(self, layer: ExpertsLayer) -> None:
        experts, hidden, inter = layer.num_experts, layer.hidden_size, layer.intermediate_size
        layer.register_parameter("gate_up_proj", empty_parameter(experts, 2 * inter, hidden))
        layer.register_parameter("down_proj", empty_parameter(experts, hidden, inter))

    def load_weight(self, layer: ExpertsLayer, param: str, item: WeightItem, expert: int | None,
                    shard: int | None) -> None:
        dest: torch.Tensor = layer.gate_up_proj if param == "gate_up_proj" else layer.down_proj
        if expert is not None:
            dest = dest[expert]
        copy_rows(dest, float_tensor(item), [dest.shape[0] // 2] * 2, shard)

    def expert_forward(self, layer: ExpertsLayer, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, layer.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.down_proj[expert])
