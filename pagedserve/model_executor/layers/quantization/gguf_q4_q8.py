"""Matmuls on GGUF's legacy 32-weight blocks, Q4_0 / Q4_1 / Q8_0, kept as stored (`gguf_q4_q8.cpp`).

Which kernel runs (`kernel`): bf16 activations of MIN_AMX_ROWS to MAX_AMX_ROWS rows, on a CPU with AMX, go to the
tile kernel: strips of 32 weight rows dequantized to bf16 in cache, block by block, and multiplied on AMX tiles
while the next block is dequantized; the whole bf16 weight never exists. Otherwise up to MAX_GEMV_ROWS rows
run on the blocks: activations quantized per block to int8, VNNI integer dot products (or a plain C++ loop
without VNNI); more rows dequantize the whole weight to x's dtype in one native pass and call torch's matmul.
On a GPU, or without a compiler, the weight is dequantized per call with torch ops.

`PAGEDSERVE_GGUF_KERNEL` forces a path: `vnni` (the native kernels: VNNI, AMX where there is one), `portable`
(the plain C++ loop, and dequantize + matmul for batches) or `torch`.
"""

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from pagedserve.model_executor import gguf_loader, native

_T = GGMLQuantizationType
FORMATS: dict[int, int] = {_T.Q4_0: 0, _T.Q4_1: 1, _T.Q8_0: 2}  # ggml type -> the C++ format id
PATHS = native.KERNEL_PATHS
MAX_GEMV_ROWS = 8  # above this, dequantize and matmul (see docs/architecture.md for the measurements)
MIN_AMX_ROWS = 3  # from here on the AMX kernel beats the GEMV (bf16; they tie at 2 rows, see docs/architecture.md)
MAX_AMX_ROWS = 512  # above this, dequantize + matmul is as fast (measured: oneDNN blocks large M better)

_SOURCE = Path(__file__).with_name("gguf_q4_q8.cpp")
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None (PAGEDSERVE_NATIVE=0, or no compiler: one warning)."""
    functions: dict[str, native.Signature] = {
        "gguf_has_vnni": (_C, []),
        "gguf_has_amx": (_C, []),
        "gguf_gemm_bf16": (None, [_P, _P, _P, _I, _I, _I, _C]),
    }
    for suffix in _DTYPES.values():
        functions[f"gguf_gemv_{suffix}"] = (None, [_P, _P, _P, _I, _I, _I, _C, _C])
        functions[f"gguf_dequant_{suffix}"] = (None, [_P, _P, _I, _I, _C])
    return native.load(_SOURCE, "GGUF Q4/Q8 matmul", functions)


def default_path() -> str:
    """The path this machine takes: `PAGEDSERVE_GGUF_KERNEL` if set, else vnni where built with it, else
    portable, else torch."""
    return native.forced_path("PAGEDSERVE_GGUF_KERNEL") or _native_path()


@functools.cache
def _native_path() -> str:
    """What this machine's build runs (asked once: `matmul` takes a path on every call)."""
    library = load()
    if library is None:
        return "torch"
    return "vnni" if library.gguf_has_vnni() else "portable"


@functools.cache
def has_amx() -> bool:
    """Whether bf16 batches run on AMX tiles here (built with AMX, and Linux grants the tile state)."""
    library = load()
    return library is not None and bool(library.gguf_has_amx())


def dequantize(blocks: torch.Tensor, ggml_type: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The [n, k] weight in `dtype` (native on the CPU, torch ops elsewhere)."""
    library = load()
    if blocks.device.type != "cpu" or dtype not in _DTYPES or library is None:
        return gguf_loader.dequantize(blocks.reshape(-1), ggml_type, (n, k)).to(dtype)
    out = torch.empty(n, k, dtype=dtype)
    getattr(library, f"gguf_dequant_{_DTYPES[dtype]}")(blocks.data_ptr(), out.data_ptr(), n, k, FORMATS[ggml_type])
    return out


def kernel(m: int, dtype: torch.dtype, path: str) -> str:
    """What `matmul` runs for m rows of `dtype` on a native `path` here: "amx", "gemv" or "dequantize" (+ matmul)."""
    if path == "vnni" and dtype == torch.bfloat16 and MIN_AMX_ROWS <= m <= MAX_AMX_ROWS and has_amx():
        return "amx"
    return "gemv" if m <= MAX_GEMV_ROWS else "dequantize"


def matmul(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, n: int, path: str | None = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, n] in x's dtype, W the [n, K] weight held as `blocks` (uint8, whole rows of blocks)."""
    m, k = x.shape
    path = path or default_path()
    library = load()
    if path == "torch" or x.device.type != "cpu" or x.dtype not in _DTYPES or library is None:
        return F.linear(x, gguf_loader.dequantize(blocks.reshape(-1), ggml_type, (n, k)).to(x.dtype))
    which = kernel(m, x.dtype, path)
    if which == "dequantize":
        return F.linear(x, dequantize(blocks, ggml_type, n, k, x.dtype))
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype)
    if which == "amx":
        library.gguf_gemm_bf16(x.data_ptr(), blocks.data_ptr(), out.data_ptr(), m, n, k, FORMATS[ggml_type])
    else:
        getattr(library, f"gguf_gemv_{_DTYPES[x.dtype]}")(
            x.data_ptr(), blocks.data_ptr(), out.data_ptr(), m, n, k, FORMATS[ggml_type], int(path == "portable")
        )
    return out
