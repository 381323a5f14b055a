"""The native CPU attention kernels, built on first use (see `native/build.py`) and called via ctypes: decode from
`paged_attention_cpu.cpp`, AMX prefill from `paged_prefill_cpu.cpp`. Without a C++ compiler, or with
`PAGEDSERVE_ATTENTION_BACKEND=torch`, attention stays on the portable PyTorch path.
"""

import ctypes
import functools
import os
from pathlib import Path

import torch

from pagedserve.native import build

_SOURCE = Path(__file__).with_name("paged_attention_cpu.cpp")
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with one warning) when it cannot be built here."""
    if os.environ.get("PAGEDSERVE_ATTENTION_BACKEND", "native") == "torch":
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    # out, q, q_stride, kv_cache, block_tables, block_table_stride, context_lens, window_starts, six sizes, scale,
    # soft_cap
    attention = [pointer, pointer, size, pointer, pointer, size, pointer, pointer, *[size] * 6, ctypes.c_float,
                 ctypes.c_float]
    functions: dict[str, build.Signature] = {"paged_decode_attention_path": (ctypes.c_int, [size])}
    functions.update({f"paged_decode_attention_{dtype}": (None, attention) for dtype in _DTYPES.values()})
    return build.load(_SOURCE, "decode attention", functions)


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
    """q: [B, H, D] (one token per sequence; its rows may be apart, as in a view of the qkv projection);
    kv_cache: [2, Hkv, num_blocks, block_size, D]; block_tables: [B, >= blocks used] int64; context_lens: [B]
    int64; window_starts: [B] int64, first visible position. Returns [B, H, D]. Call only where `supports(q)`."""
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    assert kv_cache.is_contiguous() and kv_cache.dtype == q.dtype
    assert block_tables.dtype == context_lens.dtype == torch.int64 and block_tables.stride(1) == 1
    assert context_lens.is_contiguous() and (window_starts is None or window_starts.is_contiguous())
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, num_blocks, block_size, _ = kv_cache.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    function = getattr(load_kernel(), f"paged_decode_attention_{_DTYPES[q.dtype]}")
    function(
        out.data_ptr(), q.data_ptr(), q.stride(0), kv_cache.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
        context_lens.data_ptr(), None if window_starts is None else window_starts.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size, scale, soft_cap or 0.0,
    )
    return out


_PREFILL_SOURCE = Path(__file__).with_name("paged_prefill_cpu.cpp")


@functools.cache
def load_prefill_kernel() -> ctypes.CDLL | None:
    """The AMX prefill-attention library (paged_prefill_cpu.cpp), or None where it cannot be built."""
    if os.environ.get("PAGEDSERVE_ATTENTION_BACKEND", "native") == "torch":
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    return build.load(_PREFILL_SOURCE, "prefill attention", {
        "paged_prefill_attention_supported": (ctypes.c_int, [size, size]),
        "paged_prefill_attention_bf16": (None, [
            pointer, size, pointer, size, pointer, size, size, size, size, pointer, pointer, pointer, pointer, size,
            size, size, ctypes.c_float, size, ctypes.c_float,
        ]),
    })


def supports_prefill(q: torch.Tensor, block_size: int) -> bool:
    """The AMX prefill kernel runs bf16 with head_dim 64 or 128 on CPUs with AMX, any sliding window and soft-cap
    (else: PyTorch's SDPA)."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or q.stride(-1) != 1 or q.stride(-2) != q.shape[-1]:
        return False
    library = load_prefill_kernel()
    return library is not None and bool(library.paged_prefill_attention_supported(q.shape[-1], block_size))


def paged_prefill_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> None:
    """Causal attention of every prefill chunk of the step, written into `out` ([T, H, D], rows contiguous); with a
    sliding window W a query at p sees keys p - W < k <= p, and soft_cap maps scores s to cap * tanh(s / cap).

    q: [T, H, D] (rows may be strided); kv_cache: [2, Hkv, num_blocks, block_size, D], holding the chunks' own K/V
    already; per chunk (int64 [C]): its first row in q, its length, its context length (its positions end there);
    block_tables: [C, >= blocks of the longest context] int64. Call only where `supports_prefill`."""
    assert kv_cache.is_contiguous() and out.stride(-2) == out.shape[-1] and out.stride(-1) == 1
    for t in (query_starts, query_lens, context_lens):
        assert t.dtype == torch.int64 and t.is_contiguous()
    assert block_tables.dtype == torch.int64 and block_tables.stride(1) == 1
    _, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    library = load_prefill_kernel()
    assert library is not None
    library.paged_prefill_attention_bf16(
        out.data_ptr(), out.stride(0), q.data_ptr(), q.stride(0), kv_cache.data_ptr(), num_blocks, block_size,
        head_dim, len(query_starts), query_starts.data_ptr(), query_lens.data_ptr(), context_lens.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0), q.shape[1], num_kv_heads, scale, sliding_window or 0,
        soft_cap or 0.0,
    )
