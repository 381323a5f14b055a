"""The fused CPU layer ops against their PyTorch definitions: RMSNorm, residual add + RMSNorm, rope in place."""

import pytest
import torch
import torch.nn.functional as F

from pagedserve.model_executor.layers import cpu_ops
from pagedserve.model_executor.layers.rotary import apply_rotary

# float32: the same math in another order; bfloat16: one rounding at the end against PyTorch's several
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def native():
    assert cpu_ops.load() is not None, "the CPU ops must build on this machine"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [576, 64, 37])  # 37: the scalar tail of the vector loop
def test_rms_norm_and_add(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(19, dim, generator=gen).to(dtype)
    residual = torch.randn(19, dim, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(cpu_ops.rms_norm(x, weight, 1e-5).float(),
                               F.rms_norm(x.float(), (dim,), weight.float(), 1e-5), atol=tol, rtol=tol)
    wide = torch.randn(19, dim + 11, generator=gen).to(dtype)  # strided rows: a slice of a wider tensor
    torch.testing.assert_close(cpu_ops.rms_norm(wide[:, :dim], weight, 1e-5).float(),
                               F.rms_norm(wide[:, :dim].float(), (dim,), weight.float(), 1e-5), atol=tol, rtol=tol)
    expected_residual = x + residual  # rounded to the dtype, as an add in it
    expected = F.rms_norm(expected_residual.float(), (dim,), weight.float(), 1e-5)
    cpu_ops.add_rms_norm_(x, residual, weight, 1e-5)
    assert torch.equal(residual, expected_residual)
    torch.testing.assert_close(x.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 128), (32, 24), (80, 48)])
def test_rope_in_place(dtype, head_dim, rotary_dim):
    """q and k heads inside one fused qkv row, rotated where they lie; a partial rotary leaves the rest."""
    gen = torch.Generator().manual_seed(head_dim)
    tokens, q_heads, kv_heads = 13, 4, 2
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    angles = torch.rand(tokens, rotary_dim // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q = qkv[:, : q_heads * head_dim].reshape(tokens, q_heads, head_dim).float()
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim).float()
    v = qkv[:, (q_heads + kv_heads) * head_dim :].clone()
    expected_q = apply_rotary(q, cos.unsqueeze(1), sin.unsqueeze(1))
    expected_k = apply_rotary(k, cos.unsqueeze(1), sin.unsqueeze(1))
    cpu_ops.rope_(qkv, cos, sin, 0, q_heads, head_dim)
    cpu_ops.rope_(qkv, cos, sin, q_heads * head_dim, kv_heads, head_dim)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(qkv[:, : q_heads * head_dim].reshape(tokens, q_heads, head_dim).float(), expected_q,
                               atol=tol, rtol=tol)
    torch.testing.assert_close(
        qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim).float(),
        expected_k, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, (q_heads + kv_heads) * head_dim :], v)  # v untouched


def test_other_dtypes_and_devices_are_not_supported():
    assert cpu_ops.supports(torch.zeros(2, dtype=torch.bfloat16))
    assert not cpu_ops.supports(torch.zeros(2, dtype=torch.float16))
