"""Int8Linear / Int4Linear / QuantizedExperts and quantize_model: each computes with the weights its buffers
mean, stays within the format's rounding of the float layer, and replaces exactly the layers vLLM quantizes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.model_executor.layers.linear import GateUpLinear
from pagedserve.model_executor.layers.moe import FusedExperts, SparseMoeBlock, select_experts
from pagedserve.model_executor.layers.quantization import int_quant
from pagedserve.model_executor.layers.quantization.int_linear import (
    Int4Linear,
    Int8Linear,
    QuantizedExperts,
    int4_group_size,
    quantize_model,
)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The float weight a quantized layer's buffers mean."""
    if isinstance(layer, Int8Linear):
        return int_quant.dequantize_int8(layer.qweight, layer.scales, torch.float32)
    assert isinstance(layer, Int4Linear)
    return int_quant.dequantize_int4(layer.packed, layer.scales, layer.zeros, layer.group_size, torch.float32)


def quantize(kind: str, weight: torch.Tensor, bias: nn.Parameter | None = None) -> nn.Module:
    return Int8Linear.quantize(weight, bias) if kind == "int8" else Int4Linear.quantize(weight, 64, bias)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_forward_is_the_dequantized_linear(kind, monkeypatch):
    """Torch path, float32: exactly F.linear with the dequantized weight and the kept bias, any leading shape."""
    monkeypatch.setenv("PAGEDSERVE_INT_KERNEL", "torch")
    bias = nn.Parameter(gaussian(96, seed=1))
    layer = quantize(kind, gaussian(96, 192), bias)
    assert layer.bias is bias
    x = gaussian(2, 3, 192, seed=2)
    torch.testing.assert_close(layer(x), F.linear(x, dequantized(layer), bias), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_default_path_is_close_to_the_dequantized_linear(kind, rows, dtype):
    """Whatever int_quant runs here (VNNI quantizes the activations): within 1% (bf16: 2%) of the output norm."""
    layer = quantize(kind, gaussian(96, 192))
    x = gaussian(rows, 192, seed=3)
    ref = F.linear(x.double(), dequantized(layer).double())
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    error = (out.double() - ref).norm() / ref.norm()
    assert error < (0.01 if dtype == torch.float32 else 0.02), error


@pytest.mark.parametrize(("kind", "bound"), [("int8", 0.015), ("int4", 0.15)])
def test_quantization_error_of_a_gaussian_layer(kind, bound):
    """Output error against the float weight (measured: int8 per channel 1.1% with its int8 activations, int4 in
    groups of 64 9%)."""
    weight = gaussian(256, 512)
    x = gaussian(16, 512, seed=4)
    ref = F.linear(x, weight)
    error = (quantize(kind, weight)(x) - ref).norm() / ref.norm()
    assert error < bound, error


def test_silu_and_mul_of_a_fused_gate_up():
    weight = gaussian(2 * 64, 128)
    layer = Int8Linear.quantize(weight)
    x = gaussian(5, 128, seed=5)
    gate, up = layer(x).chunk(2, dim=-1)
    torch.testing.assert_close(layer.silu_and_mul(x), F.silu(gate) * up)


def test_int4_group_sizes():
    """128 where it divides K, else the largest multiple of 32 that does (tiny models), else none."""
    assert [int4_group_size(k) for k in (128, 4096, 64, 96, 160, 32, 48)] == [128, 128, 64, 96, 32, 32, None]
    with pytest.raises(ValueError, match="multiple of 32 dividing"):
        Int4Linear(96, 8, 64)
    with pytest.raises(ValueError, match="multiple of 32 dividing"):
        Int4Linear(48, 8, 48)


def test_quantized_experts_route_as_fused_experts(monkeypatch):
    """Same routing, per-expert quantized MLPs: equal to FusedExperts holding the dequantized weights."""
    monkeypatch.setenv("PAGEDSERVE_INT_KERNEL", "torch")
    num_experts, hidden, inter = 6, 64, 32
    gate_up = [Int4Linear.quantize(gaussian(2 * inter, hidden, seed=e), 32) for e in range(num_experts)]
    down = [Int4Linear.quantize(gaussian(hidden, inter, seed=10 + e), 32) for e in range(num_experts)]
    experts = QuantizedExperts(gate_up, down)
    fused = FusedExperts(num_experts, hidden, inter)
    with torch.no_grad():
        fused.gate_up_proj.copy_(torch.stack([dequantized(m) for m in gate_up]))
        fused.down_proj.copy_(torch.stack([dequantized(m) for m in down]))
    x = gaussian(9, hidden, seed=20)
    weights, expert_ids = select_experts(gaussian(9, num_experts, seed=21), 2, renormalize=True)
    torch.testing.assert_close(experts(x, weights, expert_ids), fused(x, weights, expert_ids))


class TinyModel(nn.Module):
    """A decoder layer's worth of linears, a MoE block with a shared expert, a narrow layer and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(64, 192, bias=True)
        self.gate_up_proj = GateUpLinear(64, 128, bias=False)
        self.narrow = nn.Linear(48, 64)  # K = 48: no int4 group size
        shared = nn.Sequential(nn.Linear(64, 64))
        self.moe = SparseMoeBlock(64, 32, num_experts=4, top_k=2, renormalize=False, shared_expert=shared)
        self.lm_head = nn.Linear(64, 100, bias=False)
        for p in self.parameters():
            nn.init.normal_(p, std=0.2)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantize_model_replaces_what_vllm_quantizes(method):
    model = TinyModel()
    bias = model.qkv_proj.bias
    done, kept = quantize_model(model, method)
    kind = Int8Linear if method == "int8" else Int4Linear
    assert isinstance(model.qkv_proj, kind) and model.qkv_proj.bias is bias
    assert isinstance(model.gate_up_proj, kind)
    assert isinstance(model.moe.experts, QuantizedExperts) and isinstance(model.moe.experts.down_proj[3], kind)
    assert isinstance(model.moe.shared_expert[0], kind)
    # the head and the routers (the experts' gate, the shared expert's sigmoid gate) stay float
    assert type(model.lm_head) is nn.Linear and type(model.moe.gate) is nn.Linear
    assert type(model.moe.shared_expert_gate) is nn.Linear
    if method == "int8":
        assert isinstance(model.narrow, Int8Linear) and (done, kept) == (5, 0)
    else:
        assert type(model.narrow) is nn.Linear and (done, kept) == (4, 1)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="must be one of"):
        quantize_model(TinyModel(), "int3")
