"""The native CPU decode-attention kernel: built from `paged_attention_cpu.cpp` on first use (see `native.py`),
called via ctypes. Without a C++ compiler, or with `PAGEDSERVE_ATTENTION_BACKEND=torch`, attention stays on the
portable PyTorch path.
"""

import ctypes
import functools
import os
from pathlib import Path

import torch

from pagedserve.model_executor import native

_SOURCE = Path(__file__).with_name("paged_attention_cpu.cpp")
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with one warning) when it cannot be built here."""
    if os.environ.get("PAGEDSERVE_ATTENTION_BACKEND", "native") == "torch":
        return None
    library = native.load(_SOURCE, "decode attention")
    if library is None:
        return None
    library.paged_decode_attention_path.restype = ctypes.c_int
    library.paged_decode_attention_path.argtypes = [ctypes.c_int64]
    for dtype in _DTYPES.values():
        function = getattr(library, f"paged_decode_attention_{dtype}")
        function.restype = None
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 6 + [
            ctypes.c_float
        ] * 2
    return library


def kernel_path(head_dim: int) -> str:
    """Which code runs decode attention for this head size: "avx512", "portable" (the kernel's plain loop), or
    "torch" (no kernel here)."""
    library = load_kernel()
    if library is None:
        return "torch"
    return "avx512" if library.paged_decode_attention_path(head_dim) else "portable"


def supports(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in _DTYPES and load_kernel() is not None


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    window_starts: torch.Tensor | None,
    scale: float,
    soft_cap: float | None,
) -> torch.Tensor:
    """q: [B, H, D] (one token per sequence); kv_cache: [2, Hkv, num_blocks, block_size, D]; block_tables:
    [B, >= blocks used] int64; context_lens: [B] int64; window_starts: [B] int64, first visible position.
    Returns [B, H, D]. Call only where `supports(q)`."""
    q = q.contiguous()
    assert kv_cache.is_contiguous() and kv_cache.dtype == q.dtype
    assert block_tables.dtype == context_lens.dtype == torch.int64 and block_tables.stride(1) == 1
    assert context_lens.is_contiguous() and (window_starts is None or window_starts.is_contiguous())
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, num_blocks, block_size, _ = kv_cache.shape
    out = torch.empty_like(q)
    function = getattr(load_kernel(), f"paged_decode_attention_{_DTYPES[q.dtype]}")
    function(
        out.data_ptr(), q.data_ptr(), kv_cache.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
        context_lens.data_ptr(), None if window_starts is None else window_starts.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size, scale, soft_cap or 0.0,
    )
    return out
