"""Matmuls on GGUF's legacy 32-weight blocks, Q4_0 / Q4_1 / Q8_0, kept as stored (`gguf_q4_q8.cpp`).

Small M (decode) runs on the blocks: activations quantized per block to int8, VNNI integer dot products (or a
plain C++ loop without VNNI). Larger M dequantizes the weight to x's dtype in one native pass and calls
torch's matmul: that is where a batch is compute bound and oneDNN's bf16 kernels win. On a GPU, or without a
compiler, the weight is dequantized per call with torch ops.

`PAGEDSERVE_GGUF_KERNEL` forces a path: `vnni`, `portable` (the plain C++ loop) or `torch`.
"""

import ctypes
import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from pagedserve.model_executor import gguf_loader, native

_T = GGMLQuantizationType
FORMATS: dict[int, int] = {_T.Q4_0: 0, _T.Q4_1: 1, _T.Q8_0: 2}  # ggml type -> the C++ format id
PATHS = ("vnni", "portable", "torch")
MAX_GEMV_ROWS = 8  # above this, dequantize and matmul (see docs/architecture.md for the measurements)

_SOURCE = Path(__file__).with_name("gguf_q4_q8.cpp")
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None (PAGEDSERVE_NATIVE=0, or no compiler: one warning)."""
    if os.environ.get("PAGEDSERVE_NATIVE", "1") == "0":
        return None
    functions: dict[str, native.Signature] = {"gguf_has_vnni": (_C, [])}
    for suffix in _DTYPES.values():
        functions[f"gguf_gemv_{suffix}"] = (None, [_P, _P, _P, _I, _I, _I, _C, _C])
        functions[f"gguf_dequant_{suffix}"] = (None, [_P, _P, _I, _I, _C])
    return native.load(_SOURCE, "GGUF Q4/Q8 matmul", functions)


def default_path() -> str:
    """The path this machine takes: `PAGEDSERVE_GGUF_KERNEL` if set, else vnni where built with it, else
    portable, else torch."""
    forced = os.environ.get("PAGEDSERVE_GGUF_KERNEL")
    if forced:
        if forced not in PATHS:
            raise ValueError(f"PAGEDSERVE_GGUF_KERNEL must be one of {PATHS}, got {forced!r}")
        return forced
    return _native_path()


@functools.cache
def _native_path() -> str:
    """What this machine's build runs (asked once: `matmul` takes a path on every call)."""
    library = load()
    if library is None:
        return "torch"
    return "vnni" if library.gguf_has_vnni() else "portable"


def dequantize(blocks: torch.Tensor, ggml_type: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The [n, k] weight in `dtype` (native on the CPU, torch ops elsewhere)."""
    library = load()
    if blocks.device.type != "cpu" or dtype not in _DTYPES or library is None:
        return gguf_loader.dequantize(blocks.reshape(-1), ggml_type, (n, k)).to(dtype)
    out = torch.empty(n, k, dtype=dtype)
    getattr(library, f"gguf_dequant_{_DTYPES[dtype]}")(blocks.data_ptr(), out.data_ptr(), n, k, FORMATS[ggml_type])
    return out


def matmul(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, n: int, path: str | None = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, n] in x's dtype, W the [n, K] weight held as `blocks` (uint8, whole rows of blocks)."""
    m, k = x.shape
    path = path or default_path()
    native_ok = x.device.type == "cpu" and x.dtype in _DTYPES and load() is not None
    if path == "torch" or not native_ok:
        return F.linear(x, gguf_loader.dequantize(blocks.reshape(-1), ggml_type, (n, k)).to(x.dtype))
    if m > MAX_GEMV_ROWS:
        return F.linear(x, dequantize(blocks, ggml_type, n, k, x.dtype))
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype)
    getattr(load(), f"gguf_gemv_{_DTYPES[x.dtype]}")(
        x.data_ptr(), blocks.data_ptr(), out.data_ptr(), m, n, k, FORMATS[ggml_type], int(path == "portable")
    )
    return out
