"""Linear layers and MoE experts whose weights are integers: int8 per output channel, int4 in groups along K.

`Int8Linear` / `Int4Linear` take the place of an `nn.Linear` (keeping its bias parameter), as `GGUFLinear`
does: `quantization="int8" | "int4"` quantizes a loaded float model with `quantize_model`, and GPTQ / AWQ
checkpoints fill an empty `Int4Linear`'s buffers row range by row range (a fused q/k/v or gate/up layer is its
parts' rows one after another, in every buffer). `QuantizedExperts` holds one quantized gate/up and one down
layer per expert and reuses `GroupedExperts`' routing. The matmuls are `int_quant`'s.
"""

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from pagedserve.model_executor.layers.moe import FusedExperts, GroupedExperts, SparseMoeBlock
from pagedserve.model_executor.layers.quantization import int_quant
from pagedserve.model_executor.layers.quantization.base import QuantizedLinear

INT_METHODS = ("int8", "int4")  # the `quantization` values that quantize a float checkpoint at load
INT4_GROUP_SIZE = 128


class Int8Linear(QuantizedLinear):
    """w = qweight * scales[n]: int8 [N, K], one float32 scale per output channel."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, bias: nn.Parameter | None = None, device: torch.device | None = None
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: nn.Parameter | None = None) -> "Int8Linear":
        layer = cls(weight.shape[1], weight.shape[0], bias, weight.device)
        layer.qweight, layer.scales = int_quant.quantize_int8(weight.detach())
        return layer

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return int_quant.matmul_int8(rows, self.qweight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(QuantizedLinear):
    """w = (q - zeros[n, g]) * scales[n, g] over groups of `group_size` weights along K; q packed by
    `int_quant.pack_int4` (whole rows), scales float32 and zeros uint8 [N, K / group_size]."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: nn.Parameter | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        if group_size % 32 or in_features % group_size:
            raise ValueError(f"int4 group size {group_size} must be a multiple of 32 dividing in_features "
                             f"{in_features}")
        self.group_size = group_size
        row_bytes = int_quant.pack_int4(torch.zeros(0, in_features, dtype=torch.uint8)).shape[1]
        groups = in_features // group_size
        self.register_buffer("packed", torch.empty(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8, device=device))

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int, bias: nn.Parameter | None = None) -> "Int4Linear":
        layer = cls(weight.shape[1], weight.shape[0], group_size, bias, weight.device)
        layer.packed, layer.scales, layer.zeros = int_quant.quantize_int4(weight.detach(), group_size)
        return layer

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return int_quant.matmul_int4(rows, self.packed, self.scales, self.zeros, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group_size={self.group_size}")


class QuantizedExperts(GroupedExperts):
    """MoE experts with integer weights: `gate_up_proj[e]` (fused gate/up) and `down_proj[e]` per expert."""

    def __init__(self, gate_up_proj: list[QuantizedLinear], down_proj: list[QuantizedLinear],
                 first_expert: int = 0) -> None:
        super().__init__()
        self.num_experts = len(gate_up_proj)
        self.first_expert = first_expert
        self.gate_up_proj = nn.ModuleList(gate_up_proj)
        self.down_proj = nn.ModuleList(down_proj)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = cast(QuantizedLinear, self.gate_up_proj[expert])
        return self.down_proj[expert](gate_up.silu_and_mul(x))


def int4_group_size(in_features: int) -> int | None:
    """128, or for narrower layers the largest multiple of 32 dividing K; None when K is no multiple of 32."""
    if in_features % INT4_GROUP_SIZE == 0:
        return INT4_GROUP_SIZE
    return next((g for g in range(INT4_GROUP_SIZE - 32, 0, -32) if in_features % g == 0), None)


def quantizer(method: str) -> Callable[[torch.Tensor, nn.Parameter | None], QuantizedLinear | None]:
    """(float weight [N, K], bias) -> its integer layer for `method` ("int8" / "int4"), None if it cannot be."""
    if method == "int8":
        return Int8Linear.quantize

    def int4(weight: torch.Tensor, bias: nn.Parameter | None) -> QuantizedLinear | None:
        group_size = int4_group_size(weight.shape[1])
        return None if group_size is None else Int4Linear.quantize(weight, group_size, bias)

    if method == "int4":
        return int4
    raise ValueError(f"integer quantization must be one of {INT_METHODS}, got {method!r}")


def quantize_model(model: nn.Module, method: str) -> tuple[int, int]:
    """Replace every linear layer but the head and the MoE routers (vLLM quantizes neither; embeddings and
    norms are no linears) by its `method` form, and every `FusedExperts` by `QuantizedExperts`, in place.
    Returns (layers quantized, layers kept float because no int4 group size fits their width)."""
    quantize = quantizer(method)
    routers = {id(m.gate) for m in model.modules() if isinstance(m, SparseMoeBlock)}
    routers |= {id(m.shared_expert_gate) for m in model.modules() if isinstance(m, SparseMoeBlock)
                and m.shared_expert is not None}
    head = getattr(model, "lm_head", None)
    done = kept = 0
    quantized: nn.Module | None
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not head and id(child) not in routers:
                quantized = quantize(child.weight, child.bias)
            elif isinstance(child, FusedExperts):
                quantized = _quantize_experts(child, quantize)
            else:
                continue
            if quantized is None:
                kept += 1
            else:
                setattr(module, name, quantized)
                done += 1
    return done, kept


def _quantize_experts(
    experts: FusedExperts, quantize: Callable[[torch.Tensor, nn.Parameter | None], QuantizedLinear | None]
) -> QuantizedExperts | None:
    layers = []
    for weight in (*experts.gate_up_proj, *experts.down_proj):
        layer = quantize(weight, None)
        if layer is None:
            return None
        layers.append(layer)
    return QuantizedExperts(layers[: experts.num_experts], layers[experts.num_experts :], experts.first_expert)


def empty_int4_experts(experts: FusedExperts, group_size: int | None) -> QuantizedExperts:
    """Int4 experts of `experts`' shapes with empty buffers, for a GPTQ / AWQ checkpoint to fill
    (group_size None: one group per row)."""
    def layer(weight: torch.Tensor) -> QuantizedLinear:
        n, k = weight.shape[1:]
        return Int4Linear(k, n, group_size or k, device=weight.device)

    return QuantizedExperts([layer(experts.gate_up_proj) for _ in range(experts.num_experts)],
                            [layer(experts.down_proj) for _ in range(experts.num_experts)])
