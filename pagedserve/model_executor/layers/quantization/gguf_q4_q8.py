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

from pathlib import Path

from gguf import GGMLQuantizationType

from pagedserve.model_executor.layers.quantization.gguf_family import MAX_GEMV_ROWS, Family
from pagedserve.native import build

_T = GGMLQuantizationType
FORMATS: dict[int, int] = {_T.Q4_0: 0, _T.Q4_1: 1, _T.Q8_0: 2}  # ggml type -> the C++ format id
PATHS = build.KERNEL_PATHS
MIN_AMX_ROWS = 3  # from here on the AMX kernel beats the GEMV (bf16; they tie at 2 rows, see docs/architecture.md)
MAX_AMX_ROWS = 512  # above this, dequantize + matmul is as fast (measured: oneDNN blocks large M better)

# The AVX2 GEMV against dequantize + matmul (float32, 2 threads, AMD EPYC without AVX-512): a 1536 x 576 Q4_1
# weight 0.76 against 0.82 ms at 32 rows, 1.76 against 1.09 at 64; the 49152 x 576 Q8_0 head 95 against 171 ms at 64.
MAX_PORTABLE_GEMV_ROWS = 32
FAMILY = Family("GGUF Q4/Q8 matmul", Path(__file__).with_name("gguf_q4_q8.cpp"), "gguf", FORMATS, MIN_AMX_ROWS,
                MAX_AMX_ROWS, MAX_PORTABLE_GEMV_ROWS)
load, default_path, has_amx, kernel = FAMILY.load, FAMILY.default_path, FAMILY.has_amx, FAMILY.kernel
dequantize, matmul = FAMILY.dequantize, FAMILY.matmul
__all__ = ["FORMATS", "MAX_GEMV_ROWS", "MAX_PORTABLE_GEMV_ROWS", "PATHS", "default_path", "dequantize", "has_amx",
           "kernel", "load", "matmul"]
