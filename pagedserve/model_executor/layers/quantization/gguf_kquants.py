"""Matmuls on GGUF's K-quant 256-weight super-blocks, Q4_K / Q5_K / Q6_K, kept as stored (`gguf_kquants.cpp`).

The same paths as `gguf_q4_q8` (whose path choice and `PAGEDSERVE_GGUF_KERNEL` switch this shares; `kernel` says
which runs): bf16 activations of MIN_AMX_ROWS to MAX_AMX_ROWS rows, on a CPU with AMX, go to the tile kernel
(strips of 32 weight rows dequantized to bf16 in cache a super-block at a time, never the whole weight); otherwise
small M (decode) runs on the blocks, activations quantized per 32-weight sub-block to int8 and VNNI integer dot
products (or a plain C++ loop without VNNI); larger M dequantizes the weight to x's dtype in one native pass and
calls torch's matmul; on a GPU, or without a compiler, the weight is dequantized per call with torch ops.
"""

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from pagedserve.model_executor import gguf_loader, native
from pagedserve.model_executor.layers.quantization import gguf_q4_q8

_T = GGMLQuantizationType
FORMATS: dict[int, int] = {_T.Q4_K: 0, _T.Q5_K: 1, _T.Q6_K: 2}  # ggml type -> the C++ format id
PATHS = gguf_q4_q8.PATHS
MAX_GEMV_ROWS = gguf_q4_q8.MAX_GEMV_ROWS
# The AMX kernel's row range (bf16, one thread, (N, K) = (3072, 768) and (768, 2048)):
# dequantizing a K-quant super-block costs more than a legacy block, so the GEMV keeps up to 4 rows (from 5 rows
# on AMX is faster for every format); dequantize + matmul is faster from 768 rows on.
MIN_AMX_ROWS = 5
MAX_AMX_ROWS = 512
default_path = gguf_q4_q8.default_path

_SOURCE = Path(__file__).with_name("gguf_kquants.cpp")
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None (PAGEDSERVE_NATIVE=0, or no compiler: one warning)."""
    functions: dict[str, native.Signature] = {
        "gguf_kquants_has_vnni": (_C, []),
        "gguf_kquants_has_amx": (_C, []),
        "gguf_kquants_gemm_bf16": (None, [_P, _P, _P, _I, _I, _I, _C]),
    }
    for suffix in _DTYPES.values():
        functions[f"gguf_kquants_gemv_{suffix}"] = (None, [_P, _P, _P, _I, _I, _I, _C, _C])
        functions[f"gguf_kquants_dequant_{suffix}"] = (None, [_P, _P, _I, _I, _C])
    return native.load(_SOURCE, "GGUF K-quant matmul", functions)


@functools.cache
def has_amx() -> bool:
    """Whether bf16 batches run on AMX tiles here (built with AMX, and Linux grants the tile state)."""
    library = load()
    return library is not None and bool(library.gguf_kquants_has_amx())


def kernel(m: int, dtype: torch.dtype, path: str) -> str:
    """What `matmul` runs for m rows of `dtype` on a native `path` here: "amx", "gemv" or "dequantize" (+ matmul)."""
    if path == "vnni" and dtype == torch.bfloat16 and MIN_AMX_ROWS <= m <= MAX_AMX_ROWS and has_amx():
        return "amx"
    return "gemv" if m <= MAX_GEMV_ROWS else "dequantize"


def dequantize(blocks: torch.Tensor, ggml_type: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The [n, k] weight in `dtype` (native on the CPU, torch ops elsewhere)."""
    library = load()
    if blocks.device.type != "cpu" or dtype not in _DTYPES or library is None:
        return gguf_loader.dequantize(blocks.reshape(-1), ggml_type, (n, k)).to(dtype)
    out = torch.empty(n, k, dtype=dtype)
    getattr(library, f"gguf_kquants_dequant_{_DTYPES[dtype]}")(
        blocks.data_ptr(), out.data_ptr(), n, k, FORMATS[ggml_type]
    )
    return out


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
        library.gguf_kquants_gemm_bf16(x.data_ptr(), blocks.data_ptr(), out.data_ptr(), m, n, k, FORMATS[ggml_type])
    else:
        getattr(library, f"gguf_kquants_gemv_{_DTYPES[x.dtype]}")(
            x.data_ptr(), blocks.data_ptr(), out.data_ptr(), m, n, k, FORMATS[ggml_type], int(path == "portable")
        )
    return out
