"""Integer-quantized weights for Hugging Face checkpoints: int8 per output channel and int4 in groups along K,
quantized here and multiplied natively (`int_quant.cpp`).

int8: w = q * scale[n], q in -127..127 (symmetric, absmax / 127 per output row).
int4: w = (q - zero[n, g]) * scale[n, g], q and zero in 0..15, groups of `group_size` along K (a multiple of 32
that divides K; GPTQ / AWQ use 32, 64 or 128; group_size = K is one group per row). The range of a group is
widened to include 0 so that zero is an exact integer in 0..15: every weight is within scale / 2 of its
dequantized value (the same as HF / AWQ's zero-point quantizer whenever a group holds weights of both signs).

The kernels quantize x on the fly to int8 plus an int8 remainder (x = d (q + r / 128), within d / 256; int8 alone,
vLLM's dynamic per-token W8A8, costs accuracy: see int_quant.cpp) and run integer dot products on AVX512-VNNI:
int8 with one d per row of x, int4 with one d per 32-block. Batches run on AMX tiles: int8 on int8 tiles (the
same arithmetic, the same bits), int4 with bf16 x on bf16 tiles (x as it is, the weight dequantized strip by
strip). Where neither fits (no AMX, float32 x) int4 batches dequantize the weight natively and call torch's matmul.

Packed int4 layout (what `pack_int4` makes and the kernels read): uint8 [N, 32 * ceil(K / 64)]; each 64 weights
of a row are 32 bytes, byte j holding weight j in its low nibble and weight j + 32 in its high nibble, so one
mask and one shift give the 64 weights in order. A last chunk of 32 weights (K % 64 == 32) leaves the high
nibbles zero.

Paths: `vnni` (AVX512-VNNI, AMX for batches), `portable` (plain C++ on float weights and exact activations) and
`torch` (the weight dequantized per call with torch ops, then F.linear: the GPU / no-compiler path, exact in
float32). `PAGEDSERVE_INT_KERNEL` forces one; otherwise the best this machine's build has. A non-CPU tensor, or a
dtype other than float32 / bfloat16, always takes the torch path.
"""

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from pagedserve.native import build

PATHS = build.KERNEL_PATHS
# Where the batched kernels take over (measured, docs/architecture.md): int8 on AMX int8 tiles from
# MIN_INT8_AMX_ROWS rows; int4 with bf16 x on AMX bf16 tiles (the weight dequantized tile by tile) above
# MAX_INT4_GEMV_ROWS_AMX rows; int4 without AMX or with float32 x dequantizes the weight and calls torch's matmul
# above MAX_INT4_GEMV_ROWS rows.
MIN_INT8_AMX_ROWS = 4
MAX_INT4_GEMV_ROWS_AMX = 4
MAX_INT4_GEMV_ROWS = 16

_SOURCE = Path(__file__).with_name("int_quant.cpp")
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None (PAGEDSERVE_NATIVE=0, or no compiler: one warning)."""
    functions: dict[str, build.Signature] = {
        "int_has_vnni": (_C, []),
        "int_has_amx": (_C, []),
        "int4_matmul_amx_bf16": (None, [_P, _P, _P, _P, _P, _I, _I, _I, _I]),
    }
    for suffix in _DTYPES.values():
        functions[f"int8_matmul_{suffix}"] = (None, [_P, _P, _P, _P, _I, _I, _I, _C])
        functions[f"int8_matmul_amx_{suffix}"] = (None, [_P, _P, _P, _P, _I, _I, _I])
        functions[f"int4_matmul_{suffix}"] = (None, [_P, _P, _P, _P, _P, _I, _I, _I, _I, _C])
        functions[f"int4_dequant_{suffix}"] = (None, [_P, _P, _P, _P, _I, _I, _I])
    return build.load(_SOURCE, "int8 / int4 matmul", functions)


def default_path() -> str:
    """`PAGEDSERVE_INT_KERNEL` if set, else vnni where the build has it, else portable, else torch."""
    return build.forced_path("PAGEDSERVE_INT_KERNEL") or _native_path()


@functools.cache
def _native_path() -> str:
    """What this machine's build runs (asked once: the matmuls take a path on every call)."""
    library = load()
    if library is None:
        return "torch"
    return "vnni" if library.int_has_vnni() else "portable"


@functools.cache
def has_amx() -> bool:
    """Whether the batched kernels can use AMX tiles here (built with AMX, and Linux grants the tile state)."""
    library = load()
    return library is not None and bool(library.int_has_amx())


def _library() -> ctypes.CDLL:
    """The loaded library, for callers that checked _runs_natively."""
    library = load()
    assert library is not None
    return library


def _runs_natively(x: torch.Tensor, path: str) -> bool:
    return path != "torch" and x.device.type == "cpu" and x.dtype in _DTYPES and load() is not None


def _check_groups(k: int, group_size: int) -> None:
    if group_size % 32 or k % group_size:
        raise ValueError(f"group_size must be a multiple of 32 that divides K, got {group_size} for K = {k}")


def _check_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int, group_size: int) -> None:
    """A native kernel reads these as raw bytes: refuse what it would misread."""
    _check_groups(k, group_size)
    n = packed.shape[0]
    expected = (n, 32 * -(-k // 64))
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise ValueError(f"packed must be uint8 {list(expected)} (from pack_int4), got {packed.dtype} "
                         f"{list(packed.shape)}")
    if tuple(scales.shape) != (n, k // group_size) or tuple(zeros.shape) != (n, k // group_size):
        raise ValueError(f"scales and zeros must be [{n}, {k // group_size}], got {list(scales.shape)} and "
                         f"{list(zeros.shape)}")


# int8, per output channel


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale float32 [N]) with w ~= q * scale, scale = absmax / 127 per row (0 for a zero row)."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype` (computed in float32, rounded once)."""
    return (qweight.float() * scales.float()[:, None]).to(dtype)


def matmul_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype, W = qweight * scales (from quantize_int8)."""
    path = path or default_path()
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.dtype != torch.int8 or qweight.shape[1] != k or tuple(scales.shape) != (n,):
        raise ValueError(f"qweight must be int8 [N, {k}] and scales [N] (from quantize_int8), got {qweight.dtype} "
                         f"{list(qweight.shape)} and {list(scales.shape)}")
    if not _runs_natively(x, path):
        return F.linear(x, dequantize_int8(qweight, scales, x.dtype))
    x, qweight, scales = x.contiguous(), qweight.contiguous(), scales.float().contiguous()
    out = torch.empty(m, n, dtype=x.dtype)
    pointers = (x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), m, n, k)
    if path == "vnni" and m >= MIN_INT8_AMX_ROWS and has_amx() and not build.batch_invariant():
        getattr(_library(), f"int8_matmul_amx_{_DTYPES[x.dtype]}")(*pointers)
    else:
        getattr(_library(), f"int8_matmul_{_DTYPES[x.dtype]}")(*pointers, int(path == "portable"))
    return out


# int4, asymmetric groups along K


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 -> the kernel's layout (module docstring): uint8 [N, 32 * ceil(K / 64)]."""
    n, k = q.shape
    chunks = -(-k // 64)
    padded = torch.zeros(n, chunks * 64, dtype=torch.uint8, device=q.device)
    padded[:, :k] = q
    halves = padded.view(n, chunks, 2, 32)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, chunks * 32)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of pack_int4: uint8 [N, K] of values 0..15."""
    n = packed.shape[0]
    chunks = packed.view(n, -1, 32)
    return torch.stack([chunks & 0x0F, chunks >> 4], dim=2).reshape(n, -1)[:, :k]


def quantize_int4(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8, scale float32 [N, K / G], zero uint8 [N, K / G]) with w ~= (q - zero) * scale per group of
    G weights along K; each group's range is widened to include 0 (module docstring)."""
    n, k = weight.shape
    _check_groups(k, group_size)
    w = weight.float().reshape(n, k // group_size, group_size)
    low, high = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scale = (high - low) / 15
    safe = torch.where(scale > 0, scale, 1)
    zero = torch.round(-low / safe).clamp_(0, 15)
    q = (torch.round(w / safe[..., None]) + zero[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scale, zero.to(torch.uint8)


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The [N, K] weight in `dtype` (computed in float32, rounded once; native on the CPU when built)."""
    n, groups = scales.shape
    k = groups * group_size
    _check_int4(packed, scales, zeros, k, group_size)
    library = load()
    if packed.device.type != "cpu" or dtype not in _DTYPES or library is None:
        return _dequantize_int4_torch(packed, scales, zeros, group_size, dtype)
    out = torch.empty(n, k, dtype=dtype)
    packed, scales, zeros = packed.contiguous(), scales.float().contiguous(), zeros.to(torch.uint8).contiguous()
    getattr(library, f"int4_dequant_{_DTYPES[dtype]}")(
        packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), n, k, group_size
    )
    return out


def _dequantize_int4_torch(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    n, groups = scales.shape
    k = groups * group_size
    q = unpack_int4(packed, k).float().reshape(n, groups, group_size)
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(n, k).to(dtype)


def matmul_int4(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    path: str | None = None,
) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype, W from quantize_int4 (packed, scales, zeros, group_size)."""
    path = path or default_path()
    m, k = x.shape
    _check_int4(packed, scales, zeros, k, group_size)
    if not _runs_natively(x, path):
        return F.linear(x, _dequantize_int4_torch(packed, scales, zeros, group_size, x.dtype))
    amx = path == "vnni" and x.dtype == torch.bfloat16 and has_amx() and not build.batch_invariant()
    max_gemv_rows = MAX_INT4_GEMV_ROWS_AMX if amx else MAX_INT4_GEMV_ROWS
    if build.batch_invariant():  # the row-wise GEMV for any number of rows (see native/build.batch_invariant)
        max_gemv_rows = m
    if m > max_gemv_rows and not amx:
        return F.linear(x, dequantize_int4(packed, scales, zeros, group_size, x.dtype))
    n = packed.shape[0]
    x, packed, scales = x.contiguous(), packed.contiguous(), scales.float().contiguous()
    zeros = zeros.to(torch.uint8).contiguous()
    out = torch.empty(m, n, dtype=x.dtype)
    pointers = (x.data_ptr(), packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), m, n, k)
    if m > max_gemv_rows:
        _library().int4_matmul_amx_bf16(*pointers, group_size)
    else:
        getattr(_library(), f"int4_matmul_{_DTYPES[x.dtype]}")(*pointers, group_size, int(path == "portable"))
    return out
