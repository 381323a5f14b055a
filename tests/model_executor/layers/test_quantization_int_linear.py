"""The int8 / int4 methods of linear layers and MoE experts, and IntConfig: each layer computes with the weights its
buffers mean, stays within the format's rounding of the float layer, and is quantized exactly where vLLM quantizes."""

import pytest
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from pagedserve.config import resolve_quantization
from pagedserve.model_executor.layers.linear import LinearBase
from pagedserve.model_executor.layers.moe import FusedExperts, SparseMoeBlock, select_experts
from pagedserve.model_executor.layers.parallel import ColumnParallelLinear, GateUpLinear, ParallelLMHead
from pagedserve.model_executor.layers.quantization import int_quant
from pagedserve.model_executor.layers.quantization.int_linear import (
    Int4CheckpointMethod,
    Int4Format,
    Int8Format,
    IntConfig,
    IntExpertsAtLoad,
    QuantizeAtLoad,
    int4_group_size,
)
from pagedserve.model_executor.layers.quantization.unquantized import (
    UnquantizedExpertsMethod,
    UnquantizedLinearMethod,
)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dequantized(layer: LinearBase) -> torch.Tensor:
    """The float weight a quantized layer's buffers mean."""
    method = layer.quant_method
    assert isinstance(method, QuantizeAtLoad)
    if isinstance(method.format, Int8Format):
        return int_quant.dequantize_int8(layer.qweight, layer.scales, torch.float32)
    assert isinstance(method.format, Int4Format)
    return int_quant.dequantize_int4(layer.packed, layer.scales, layer.zeros, method.format.group_size,
                                     torch.float32)


def load(layer: torch.nn.Module, **tensors: torch.Tensor) -> None:
    """Fill a layer as the loader does, then let it process what it loaded."""
    for name, tensor in tensors.items():
        layer.weight_loader(name, tensor, None)
    layer.process_weights_after_loading()


def quantize(kind: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> LinearBase:
    format = Int8Format() if kind == "int8" else Int4Format(64)
    layer = LinearBase(weight.shape[1], weight.shape[0], bias is not None, quant_method=QuantizeAtLoad(format))
    load(layer, weight=weight, **({} if bias is None else {"bias": bias}))
    return layer


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_forward_is_the_dequantized_linear(kind, monkeypatch):
    """Torch path, float32: exactly F.linear with the dequantized weight and the kept bias, any leading shape."""
    monkeypatch.setenv("PAGEDSERVE_INT_KERNEL", "torch")
    bias = gaussian(96, seed=1)
    layer = quantize(kind, gaussian(96, 192), bias)
    assert torch.equal(layer.bias, bias) and layer.weight is None  # the float weight is let go
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
    layer = GateUpLinear(128, 64, False, "silu", IntConfig("int8"))
    load(layer, weight=gaussian(2 * 64, 128))
    x = gaussian(5, 128, seed=5)
    gate, up = layer(x).chunk(2, dim=-1)
    torch.testing.assert_close(layer.act_and_mul(x), F.silu(gate) * up)


def test_int4_group_sizes():
    """128 where it divides K, else the largest multiple of 32 that does (tiny models), else none."""
    assert [int4_group_size(k) for k in (128, 4096, 64, 96, 160, 32, 48)] == [128, 128, 64, 96, 32, 32, None]
    with pytest.raises(ValueError, match="multiple of 32 dividing"):
        LinearBase(96, 8, False, quant_method=Int4CheckpointMethod(64))
    with pytest.raises(ValueError, match="multiple of 32 dividing"):
        LinearBase(48, 8, False, quant_method=Int4CheckpointMethod(48))


def test_quantized_experts_route_as_fused_experts(monkeypatch):
    """Same routing, per-expert quantized MLPs: equal to float experts holding the dequantized weights."""
    monkeypatch.setenv("PAGEDSERVE_INT_KERNEL", "torch")
    num_experts, hidden, inter = 6, 64, 32
    experts = FusedExperts(num_experts, hidden, inter, IntConfig("int4"))
    assert isinstance(experts.quant_method, IntExpertsAtLoad)
    gate_up = torch.stack([gaussian(2 * inter, hidden, seed=e) for e in range(num_experts)])
    down = torch.stack([gaussian(hidden, inter, seed=10 + e) for e in range(num_experts)])
    experts.weight_loader("gate_up_proj", gate_up, None, None)
    experts.weight_loader("down_proj", down, None, None)
    experts.process_weights_after_loading()

    def weights(param: str, k: int) -> torch.Tensor:
        packed, scales, zeros = (getattr(experts, f"{param}_{name}") for name in ("packed", "scales", "zeros"))
        return torch.stack([int_quant.dequantize_int4(packed[e], scales[e], zeros[e], int4_group_size(k),
                                                      torch.float32) for e in range(num_experts)])

    fused = FusedExperts(num_experts, hidden, inter)
    with torch.no_grad():
        fused.gate_up_proj.copy_(weights("gate_up_proj", hidden))
        fused.down_proj.copy_(weights("down_proj", inter))
    x = gaussian(9, hidden, seed=20)
    w, expert_ids = select_experts(gaussian(9, num_experts, seed=21), 2, renormalize=True)
    torch.testing.assert_close(experts(x, w, expert_ids), fused(x, w, expert_ids))


class TinyModel(torch.nn.Module):
    """A decoder layer's worth of linears, a MoE block with a shared expert, a narrow layer and a head."""

    def __init__(self, config: IntConfig) -> None:
        super().__init__()
        self.qkv_proj = ColumnParallelLinear(64, [192], True, config, "qkv_proj")
        self.gate_up_proj = GateUpLinear(64, 64, False, "silu", config, "gate_up_proj")
        self.narrow = ColumnParallelLinear(48, [64], True, config, "narrow")  # K = 48: no int4 group size
        shared = ColumnParallelLinear(64, [64], True, config, "moe.shared_expert")
        self.moe = SparseMoeBlock(64, 32, num_experts=4, top_k=2, renormalize=False, shared_expert=shared,
                                  quant_config=config, prefix="moe")
        self.lm_head = ParallelLMHead(64, 100, config)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_int_config_quantizes_what_vllm_quantizes(method):
    config = IntConfig(method)
    model = TinyModel(config)
    format = Int8Format if method == "int8" else Int4Format

    def quantized(layer: LinearBase) -> bool:
        return isinstance(layer.quant_method, QuantizeAtLoad) and isinstance(layer.quant_method.format, format)

    assert quantized(model.qkv_proj) and quantized(model.gate_up_proj)
    assert isinstance(model.moe.experts.quant_method, IntExpertsAtLoad)
    assert quantized(model.moe.shared_expert)
    # the head and the routers (the experts' gate, the shared expert's sigmoid gate) stay float
    for layer in (model.lm_head, model.moe.gate, model.moe.shared_expert_gate):
        assert type(layer.quant_method) is UnquantizedLinearMethod
    if method == "int8":
        assert quantized(model.narrow) and (config.quantized, config.kept_float) == (5, 0)
    else:
        assert type(model.narrow.quant_method) is UnquantizedLinearMethod
        assert (config.quantized, config.kept_float) == (4, 1)
    narrow_experts = FusedExperts(4, 64, 48, config)  # int4: no group size for the down projection's K = 48
    assert isinstance(narrow_experts.quant_method, UnquantizedExpertsMethod if method == "int4" else IntExpertsAtLoad)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="must be one of"):
        resolve_quantization("int3", PretrainedConfig(), None, torch.device("cpu"))
