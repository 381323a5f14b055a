"""What the GGUF format families share (`gguf_q4_q8`: Q4_0 / Q4_1 / Q8_0; `gguf_kquants`: Q4_K / Q5_K / Q6_K).

Each family is one native library with the same C ABI under its own symbol prefix (`has_vnni`, `has_amx`,
`gemv_{f32,bf16}`, `gemm_bf16`, `dequant_{f32,bf16}`) and the same choice of kernel per call (`kernel`): bf16
activations of `min_amx_rows` to `max_amx_rows` rows, on a CPU with AMX, go to the tile kernel; otherwise up to
MAX_GEMV_ROWS rows run the VNNI GEMV on the blocks (without VNNI, the portable GEMV: up to the family's
`max_portable_gemv_rows`); more rows dequantize the
whole weight in one native pass and call torch's matmul. On a GPU, or without a compiler, the weight is
dequantized per call with torch ops. `PAGEDSERVE_GGUF_KERNEL` forces a path: `vnni`, `portable` or `torch`.
"""

import ctypes
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pagedserve.model_executor.gguf_weights import dequantize
from pagedserve.native import build

MAX_GEMV_ROWS = 8  # above this (without AMX: float32, portable), dequantize and matmul
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@dataclass(frozen=True, eq=False)
class Family:
    """One family's library and kernel choice. The two instances live as long as the process (module globals),
    so caching on their methods keeps nothing alive that would otherwise be freed."""

    what: str  # named in the one warning if the library cannot be built
    source: Path
    prefix: str  # of the C symbols
    formats: Mapping[int, int]  # ggml type -> the C++ format id
    min_amx_rows: int
    max_amx_rows: int
    # Rows the portable GEMV takes before dequantize + matmul wins: measured per family on the machine its kernel
    # was tuned on (an AVX2 EPYC for Q4/Q8's, whose AVX2 GEMV beats dequantizing up to ~32 rows).
    max_portable_gemv_rows: int = MAX_GEMV_ROWS

    @functools.cache  # noqa: B019 (see the class docstring)
    def load(self) -> ctypes.CDLL | None:
        """The compiled library, or None (PAGEDSERVE_NATIVE=0, or no compiler: one warning)."""
        functions: dict[str, build.Signature] = {
            f"{self.prefix}_has_vnni": (_C, []),
            f"{self.prefix}_has_amx": (_C, []),
            f"{self.prefix}_gemm_bf16": (None, [_P, _P, _P, _I, _I, _I, _C]),
        }
        for suffix in _DTYPES.values():
            functions[f"{self.prefix}_gemv_{suffix}"] = (None, [_P, _P, _P, _I, _I, _I, _C, _C])
            functions[f"{self.prefix}_dequant_{suffix}"] = (None, [_P, _P, _I, _I, _C])
        return build.load(self.source, self.what, functions)

    def default_path(self) -> str:
        """`PAGEDSERVE_GGUF_KERNEL` if set, else vnni where the build has it, else portable, else torch."""
        return build.forced_path("PAGEDSERVE_GGUF_KERNEL") or self._native_path()

    @functools.cache  # noqa: B019
    def _native_path(self) -> str:
        """What this machine's build runs (asked once: `matmul` takes a path on every call)."""
        library = self.load()
        if library is None:
            return "torch"
        return "vnni" if getattr(library, f"{self.prefix}_has_vnni")() else "portable"

    @functools.cache  # noqa: B019
    def has_amx(self) -> bool:
        """Whether bf16 batches run on AMX tiles here (built with AMX, and Linux grants the tile state)."""
        library = self.load()
        return library is not None and bool(getattr(library, f"{self.prefix}_has_amx")())

    def kernel(self, m: int, dtype: torch.dtype, path: str) -> str:
        """What `matmul` runs for m rows of `dtype` on a native `path`: "amx", "gemv" or "dequantize" (+ matmul).
        The GEMV reduces each row on its own, in the same order for any m: batch-invariant mode takes it always."""
        if build.batch_invariant():
            return "gemv"
        if path == "vnni" and dtype == torch.bfloat16 and self.min_amx_rows <= m <= self.max_amx_rows \
                and self.has_amx():
            return "amx"
        limit = self.max_portable_gemv_rows if path == "portable" else MAX_GEMV_ROWS
        return "gemv" if m <= limit else "dequantize"

    def dequantize(self, blocks: torch.Tensor, ggml_type: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        """The [n, k] weight in `dtype` (native on the CPU, torch ops elsewhere)."""
        library = self.load()
        if blocks.device.type != "cpu" or dtype not in _DTYPES or library is None:
            return dequantize(blocks.reshape(-1), ggml_type, (n, k)).to(dtype)
        out = torch.empty(n, k, dtype=dtype)
        getattr(library, f"{self.prefix}_dequant_{_DTYPES[dtype]}")(
            blocks.data_ptr(), out.data_ptr(), n, k, self.formats[ggml_type]
        )
        return out

    def matmul(self, x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, n: int,
               path: str | None = None) -> torch.Tensor:
        """x [M, K] @ W^T -> [M, n] in x's dtype, W the [n, K] weight held as `blocks` (uint8, whole rows)."""
        m, k = x.shape
        path = path or self.default_path()
        library = self.load()
        if path == "torch" or x.device.type != "cpu" or x.dtype not in _DTYPES or library is None:
            return F.linear(x, dequantize(blocks.reshape(-1), ggml_type, (n, k)).to(x.dtype))
        which = self.kernel(m, x.dtype, path)
        if which == "dequantize":
            return F.linear(x, self.dequantize(blocks, ggml_type, n, k, x.dtype))
        x = x.contiguous()
        out = torch.empty(m, n, dtype=x.dtype)
        if which == "amx":
            getattr(library, f"{self.prefix}_gemm_bf16")(
                x.data_ptr(), blocks.data_ptr(), out.data_ptr(), m, n, k, self.formats[ggml_type]
            )
        else:
            getattr(library, f"{self.prefix}_gemv_{_DTYPES[x.dtype]}")(
                x.data_ptr(), blocks.data_ptr(), out.data_ptr(), m, n, k, self.formats[ggml_type],
                int(path == "portable"),
            )
        return out
