"""Fused element-wise layer ops on the CPU (`cpu_ops.cpp`, built on first use, see native/build.py): RMSNorm, residual
add + RMSNorm, and rotary embeddings in place. Callers check `supports(x)` and otherwise use PyTorch ops.

Measured on this CPU (SmolLM2-135M, bf16, 2 threads) before they were written: at prefill sizes the PyTorch
RMSNorm (square, mean, rsqrt, multiplies, casts) was 12% of a step and rope's multiplies, negation and
concatenation most of another 10%.
"""

import ctypes
import functools
from pathlib import Path

import torch

from pagedserve.native import build

_SOURCE = Path(__file__).with_name("cpu_ops.cpp")
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "rms_norm": [_P, _P, _P, _I, _I, _I, _F],
    "add_rms_norm": [_P, _P, _P, _I, _I, _F],
    "rope": [_P, _P, _P, _I, _I, _I, _I, _I],
}


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None (PAGEDSERVE_NATIVE=0, or no compiler: one warning)."""
    functions = {f"{name}_{suffix}": (None, argtypes) for name, argtypes in _SIGNATURES.items()
                 for suffix in _DTYPES.values()}
    return build.load(_SOURCE, "RMSNorm and rope", functions)


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _DTYPES and load() is not None


def _function(name: str, dtype: torch.dtype):
    return getattr(load(), f"{name}_{_DTYPES[dtype]}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` (rows may be strided: a slice of a wider tensor)."""
    dim = x.shape[-1]
    rows = x.reshape(-1, dim) if x.stride(-1) == 1 and x.dim() == 2 else x.contiguous().view(-1, dim)
    out = torch.empty(rows.shape, dtype=x.dtype)
    _function("rms_norm", x.dtype)(out.data_ptr(), rows.data_ptr(), weight.data_ptr(), rows.shape[0], dim,
                                   rows.stride(0), eps)
    return out.view(x.shape)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x, then x = RMSNorm(residual). Both contiguous, the same shape."""
    assert x.is_contiguous() and residual.is_contiguous() and x.shape == residual.shape
    dim = x.shape[-1]
    _function("add_rms_norm", x.dtype)(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), x.numel() // dim, dim,
                                       eps)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first_column: int, num_heads: int,
          head_dim: int) -> None:
    """In place, rotate-half rope of the `num_heads` heads starting at `first_column` of each row of `x`
    ([tokens, width], rows contiguous); cos, sin: float32 [tokens, rotary_dim]."""
    assert x.stride(-1) == 1 and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous()
    tokens, rotary_dim = cos.shape
    start = x.data_ptr() + first_column * x.element_size()
    _function("rope", x.dtype)(start, cos.data_ptr(), sin.data_ptr(), tokens, num_heads, x.stride(0), head_dim,
                               rotary_dim)
