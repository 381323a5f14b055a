"""Matmuls on GGUF's K-quant 256-weight super-blocks, Q4_K / Q5_K / Q6_K, kept as stored (`gguf_kquants.cpp`).

The same paths as `gguf_q4_q8` (whose path choice and `PAGEDSERVE_GGUF_KERNEL` switch this shares): small M
(decode) runs on the blocks, activations quantized per 32-weight sub-block to int8 and VNNI integer dot products
(or a plain C++ loop without VNNI); larger M dequantizes the weight to x's dtype in one native pass and calls
torch's matmul; on a GPU, or without a compiler, the weight is dequantized per call with torch ops.
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
default_path = gguf_q4_q8.default_path

_SOURCE = Path(__file__).with_name("gguf_kquants.cpp")
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None (PAGEDSERVE_NATIVE=0, or no compiler: one warning)."""
    functions: dict[str, native.Signature] = {"gguf_kquants_has_vnni": (_C, [])}
    for suffix in _DTYPES.values():
        functions[f"gguf_kquants_gemv_{suffix}"] = (None, [_P, _P, _P, _I, _I, _I, _C, _C])
        functions[f"gguf_kquants_dequant_{suffix}"] = (None, [_P, _P, _I, _I, _C])
    return native.load(_SOURCE, "GGUF K-quant matmul", functions)


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
    native_ok = x.device.type == "cpu" and x.dtype in _DTYPES and load() is not None
    if path == "torch" or not native_ok:
        return F.linear(x, gguf_loader.dequantize(blocks.reshape(-1), ggml_type, (n, k)).to(x.dtype))
    if m > MAX_GEMV_ROWS:
        return F.linear(x, dequantize(blocks, ggml_type, n, k, x.dtype))
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype)
    getattr(load(), f"gguf_kquants_gemv_{_DTYPES[x.dtype]}")(
        x.data_ptr(), blocks.data_ptr(), out.data_ptr(), m, n, k, FORMATS[ggml_type], int(path == "portable")
    )
    return out
