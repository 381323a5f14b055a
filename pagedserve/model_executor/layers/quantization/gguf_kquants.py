"""Matmuls on GGUF's K-quant 256-weight super-blocks, Q4_K / Q5_K / Q6_K, kept as stored (`gguf_kquants.cpp`).

The same paths as `gguf_q4_q8` (`gguf_family.Family`; `kernel` says which runs): bf16 activations of MIN_AMX_ROWS
to MAX_AMX_ROWS rows, on a CPU with AMX, go to the tile kernel (strips of 32 weight rows dequantized to bf16 in
cache a super-block at a time, never the whole weight); otherwise small M (decode) runs on the blocks, activations
quantized per 32-weight sub-block to int8 and VNNI integer dot products (or a plain C++ loop without VNNI); larger
M dequantizes the weight to x's dtype in one native pass and calls torch's matmul; on a GPU, or without a
compiler, the weight is dequantized per call with torch ops.
"""

from pathlib import Path

from gguf import GGMLQuantizationType

from pagedserve.model_executor.layers.quantization.gguf_family import MAX_GEMV_ROWS, Family
from pagedserve.native import build

_T = GGMLQuantizationType
FORMATS: dict[int, int] = {_T.Q4_K: 0, _T.Q5_K: 1, _T.Q6_K: 2}  # ggml type -> the C++ format id
PATHS = build.KERNEL_PATHS
# The AMX kernel's row range (bf16, one thread, (N, K) = (3072, 768) and (768, 2048)):
# dequantizing a K-quant super-block costs more than a legacy block, so the GEMV keeps up to 4 rows (from 5 rows
# on AMX is faster for every format); dequantize + matmul is faster from 768 rows on.
MIN_AMX_ROWS = 5
MAX_AMX_ROWS = 512

FAMILY = Family("GGUF K-quant matmul", Path(__file__).with_name("gguf_kquants.cpp"), "gguf_kquants", FORMATS,
                MIN_AMX_ROWS, MAX_AMX_ROWS)
load, default_path, has_amx, kernel = FAMILY.load, FAMILY.default_path, FAMILY.has_amx, FAMILY.kernel
dequantize, matmul = FAMILY.dequantize, FAMILY.matmul
__all__ = ["FORMATS", "MAX_GEMV_ROWS", "PATHS", "default_path", "dequantize", "has_amx", "kernel", "load", "matmul"]
