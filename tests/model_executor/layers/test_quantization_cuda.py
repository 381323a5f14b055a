"""Quantized linears on a GPU: no native kernel there, the same interface dequantizes per call with torch ops
(slow, but a CUDA machine still runs every quantized checkpoint). Compared with float64 on the CPU."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize as reference_quantize
from test_quantization_gguf_kquants import random_blocks

from pagedserve.model_executor.layers.linear import LinearBase
from pagedserve.model_executor.layers.quantization import int_quant
from pagedserve.model_executor.layers.quantization.gguf import KERNEL_TYPES, GGUFLinearMethod

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N, K, M = 37, 768, 5


def _gguf_blocks(ggml_type: T) -> torch.Tensor:
    if ggml_type in (T.Q4_K, T.Q5_K, T.Q6_K):
        return random_blocks(N, K, ggml_type)
    weight = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    return torch.from_numpy(reference_quantize(weight, ggml_type).reshape(N, -1))


@pytest.mark.parametrize("ggml_type", sorted(KERNEL_TYPES), ids=lambda t: T(t).name)
def test_gguf_linear_on_gpu(ggml_type: int) -> None:
    blocks = _gguf_blocks(T(ggml_type))
    layer = LinearBase(K, N, False, quant_method=GGUFLinearMethod(ggml_type))
    layer.blocks = blocks.cuda()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    weight = torch.from_numpy(reference_dequantize(blocks.numpy(), T(ggml_type)).reshape(N, K)).double()
    out = layer(x.cuda())
    assert out.device.type == "cuda" and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), x.double() @ weight.T, rtol=1e-4, atol=1e-4)


def test_int8_and_int4_on_gpu() -> None:
    weight = torch.randn(N, 384, generator=torch.Generator().manual_seed(2))
    x = torch.randn(M, 384, generator=torch.Generator().manual_seed(3))
    qweight, scales = int_quant.quantize_int8(weight)
    reference = x.double() @ int_quant.dequantize_int8(qweight, scales, torch.float64).T
    out = int_quant.matmul_int8(x.cuda(), qweight.cuda(), scales.cuda())
    torch.testing.assert_close(out.cpu().double(), reference, rtol=1e-4, atol=1e-4)
    packed, scales4, zeros = int_quant.quantize_int4(weight, group_size=128)
    reference = x.double() @ int_quant.dequantize_int4(packed, scales4, zeros, 128, torch.float64).T
    out = int_quant.matmul_int4(x.cuda(), packed.cuda(), scales4.cuda(), zeros.cuda(), 128)
    torch.testing.assert_close(out.cpu().double(), reference, rtol=1e-4, atol=1e-4)
