"""Integer-quantized weights (int8 per channel, int4 in groups): the kernels of every path against
dequantize-then-matmul in float64, with bounds derived from the activation rounding each path does; the
quantizers' round-trip error; the int4 packing; the torch path exactly F.linear on the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

from pagedserve.model_executor.layers.quantization import int_quant

SHAPES = [(37, 384, 128), (37, 96, 32)]  # odd N; K not a power of two, K = 96 ends on a half 64-weight chunk
needs_native = pytest.mark.skipif(int_quant.load() is None, reason="no C++ compiler: the native paths cannot run")


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def random_x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(100 + m)).to(dtype)


def float_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What float arithmetic may add: K sums in float32 (k * 2^-24 relative to sum |x| |w|), and the output's
    rounding to bfloat16 (2^-8 relative, one ulp) when x is bfloat16."""
    absprod = x.double().abs() @ w.abs().T
    bound = x.shape[1] * 2**-24 * absprod
    if x.dtype == torch.bfloat16:
        bound = bound + 2**-8 * absprod
    return bound + 1e-12


def int8_bound(x: torch.Tensor, w: torch.Tensor, path: str) -> torch.Tensor:
    """vnni rounds each row of x to int8 steps of amax / 127 (one scale per token) plus an int8 remainder in steps
    of 1/128 of that: each x is off by at most amax / (127 * 256), so an output by at most that times
    sum_k |w[n, k]|. The other paths use x exactly."""
    bound = float_bound(x, w)
    if path == "vnni":
        half_step = x.double().abs().amax(dim=1, keepdim=True) / (127 * 256)  # [m, 1]
        bound = bound + half_step * w.abs().sum(dim=1)[None, :]
    return bound


def int4_gemv_quantizes_x(m: int, dtype: torch.dtype, path: str) -> bool:
    """Whether matmul_int4 runs the GEMV kernel with quantized x (else x is used as it is)."""
    amx = dtype == torch.bfloat16 and int_quant.has_amx()
    return path == "vnni" and m <= (int_quant.MAX_INT4_GEMV_ROWS_AMX if amx else int_quant.MAX_INT4_GEMV_ROWS)


def int4_bound(x: torch.Tensor, w: torch.Tensor, path: str) -> torch.Tensor:
    """vnni's GEMV rounds x per 32-block to int8 steps of amax / 127 plus a remainder in steps of 1/128 of that:
    each x is off by at most amax / (127 * 256), times sum |w| over the block, summed over blocks (the zero term
    uses the same quantized x, so it adds no error of its own). The batched paths multiply x as it is by the
    weight dequantized to x's dtype (bf16 rounding of the weight is within the 2^-8 of float_bound)."""
    m, k = x.shape
    bound = float_bound(x, w)
    if int4_gemv_quantizes_x(m, x.dtype, path):
        half_step = x.double().reshape(m, k // 32, 32).abs().amax(dim=-1) / (127 * 256)  # [m, blocks]
        bound = bound + half_step @ w.abs().reshape(-1, k // 32, 32).sum(dim=-1).T
    return bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", int_quant.PATHS)
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize(("n", "k"), [(37, 384), (37, 96), (5, 100)])  # K = 100: a tail of the 64-byte vectors
def test_matmul_int8_against_float64(n: int, k: int, m: int, path: str, dtype: torch.dtype) -> None:
    if path != "torch" and int_quant.load() is None:
        pytest.skip("no C++ compiler: the native paths cannot run")
    qweight, scales = int_quant.quantize_int8(random_weight(n, k))
    w = int_quant.dequantize_int8(qweight, scales, torch.float64)
    x = random_x(m, k, dtype)
    out = int_quant.matmul_int8(x, qweight, scales, path)
    assert out.dtype == dtype and out.shape == (m, n)
    error = (out.double() - x.double() @ w.T).abs()
    bound = int8_bound(x, w, path)
    assert bool((error <= bound).all()), f"max excess {float((error - bound).max())}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", int_quant.PATHS)
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize(("n", "k", "group_size"), [*SHAPES, (37, 384, 384), (37, 288, 96)])
def test_matmul_int4_against_float64(n: int, k: int, group_size: int, m: int, path: str, dtype: torch.dtype) -> None:
    if path != "torch" and int_quant.load() is None:
        pytest.skip("no C++ compiler: the native paths cannot run")
    packed, scales, zeros = int_quant.quantize_int4(random_weight(n, k), group_size)
    w = int_quant.dequantize_int4(packed, scales, zeros, group_size, torch.float64)
    x = random_x(m, k, dtype)
    out = int_quant.matmul_int4(x, packed, scales, zeros, group_size, path)
    assert out.dtype == dtype and out.shape == (m, n)
    error = (out.double() - x.double() @ w.T).abs()
    bound = int4_bound(x, w, path)
    assert bool((error <= bound).all()), f"max excess {float((error - bound).max())}"


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [3, 7, 64])
def test_vnni_gemv_kernels_at_every_batch(m: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The VNNI kernels (register-blocked int8, int4 GEMV) on batches the AMX or dequantize paths would take."""
    monkeypatch.setattr(int_quant, "MIN_INT8_AMX_ROWS", 10**9)
    monkeypatch.setattr(int_quant, "MAX_INT4_GEMV_ROWS_AMX", 10**9)
    monkeypatch.setattr(int_quant, "MAX_INT4_GEMV_ROWS", 10**9)
    weight, x = random_weight(37, 288), random_x(m, 288, dtype)
    qweight, scales = int_quant.quantize_int8(weight)
    w = int_quant.dequantize_int8(qweight, scales, torch.float64)
    error = (int_quant.matmul_int8(x, qweight, scales, "vnni").double() - x.double() @ w.T).abs()
    assert bool((error <= int8_bound(x, w, "vnni")).all())
    packed, scales4, zeros = int_quant.quantize_int4(weight, 96)
    w = int_quant.dequantize_int4(packed, scales4, zeros, 96, torch.float64)
    error = (int_quant.matmul_int4(x, packed, scales4, zeros, 96, "vnni").double() - x.double() @ w.T).abs()
    assert bool((error <= int4_bound(x, w, "vnni")).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_int8_equals_vnni_to_the_bit(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both run the same integer arithmetic on the same quantized x: AMX tiles change no bit of the result."""
    if not int_quant.has_amx():
        pytest.skip("this machine's build has no AMX kernels (or Linux does not grant the tile state)")
    qweight, scales = int_quant.quantize_int8(random_weight(37, 100))
    x = random_x(40, 100, dtype)  # 40 rows: two full tiles and a partial one
    amx = int_quant.matmul_int8(x, qweight, scales, "vnni")
    monkeypatch.setattr(int_quant, "MIN_INT8_AMX_ROWS", 10**9)
    assert torch.equal(amx, int_quant.matmul_int8(x, qweight, scales, "vnni"))


def test_vnni_int8_uses_per_token_scales() -> None:
    """A row of tiny activations next to a row of large ones keeps its own precision (one scale per row)."""
    if int_quant.load() is None or not int_quant.load().int_has_vnni():
        pytest.skip("this machine's build has no AVX512-VNNI kernel")
    qweight, scales = int_quant.quantize_int8(random_weight(37, 384))
    x = random_x(2, 384, torch.float32)
    x[0] *= 1e-4
    out = int_quant.matmul_int8(x, qweight, scales, "vnni")
    ref = F.linear(x, int_quant.dequantize_int8(qweight, scales, torch.float32))
    assert torch.allclose(out[0], ref[0], rtol=0.05, atol=1e-4 * 0.05 * float(ref[1].abs().max()))


@pytest.mark.parametrize(("n", "k", "group_size"), SHAPES)
def test_quantize_int4_round_trip(n: int, k: int, group_size: int) -> None:
    weight = random_weight(n, k, seed=1)
    weight[0, :group_size] = 0.5  # a constant group (representable exactly: its range includes 0)
    weight[1, :group_size] = 0.0  # an all-zero group (scale 0)
    packed, scales, zeros = int_quant.quantize_int4(weight, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (n, 32 * -(-k // 64))
    assert scales.dtype == torch.float32 and scales.shape == (n, k // group_size)
    assert zeros.dtype == torch.uint8 and int(zeros.max()) <= 15
    dq = int_quant.dequantize_int4(packed, scales, zeros, group_size, torch.float64)
    half_scale = scales.double().repeat_interleave(group_size, dim=1) / 2
    assert bool(((weight.double() - dq).abs() <= half_scale * (1 + 1e-6)).all())
    assert torch.equal(dq[0, :group_size].float(), weight[0, :group_size]) and not dq[1, :group_size].any()


def test_quantize_int8_round_trip() -> None:
    weight = random_weight(37, 100, seed=2)
    weight[3] = 0.0
    qweight, scales = int_quant.quantize_int8(weight)
    assert qweight.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (37,)
    assert int(qweight.abs().max()) == 127
    dq = int_quant.dequantize_int8(qweight, scales, torch.float64)
    assert bool(((weight.double() - dq).abs() <= scales.double()[:, None] / 2 * (1 + 1e-6)).all())
    assert not dq[3].any()


@pytest.mark.parametrize("k", [64, 96, 100, 384])
def test_pack_int4_round_trip(k: int) -> None:
    q = torch.randint(0, 16, (37, k), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    packed = int_quant.pack_int4(q)
    assert packed.shape == (37, 32 * -(-k // 64))
    assert torch.equal(int_quant.unpack_int4(packed, k), q)
    # the documented layout: byte j of a 64-weight chunk holds weight j (low nibble) and j + 32 (high nibble)
    assert int(packed[0, 0]) == int(q[0, 0]) | int(q[0, 32]) << 4


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "group_size"), SHAPES)
def test_native_dequantize_int4_equals_torch(n: int, k: int, group_size: int, dtype: torch.dtype) -> None:
    packed, scales, zeros = int_quant.quantize_int4(random_weight(n, k), group_size)
    native = int_quant.dequantize_int4(packed, scales, zeros, group_size, dtype)
    q = int_quant.unpack_int4(packed, k).float().reshape(n, -1, group_size)
    reference = ((q - zeros.float()[..., None]) * scales[..., None]).reshape(n, k).to(dtype)
    assert torch.equal(native, reference)


@pytest.mark.parametrize("m", [1, 64])
def test_torch_path_is_f_linear_on_the_dequantized_weight(m: int) -> None:
    weight, x = random_weight(37, 384), random_x(m, 384, torch.float32)
    qweight, scales = int_quant.quantize_int8(weight)
    expected = F.linear(x, int_quant.dequantize_int8(qweight, scales, torch.float32))
    assert torch.equal(int_quant.matmul_int8(x, qweight, scales, "torch"), expected)
    packed, scales4, zeros = int_quant.quantize_int4(weight, 128)
    expected = F.linear(x, int_quant.dequantize_int4(packed, scales4, zeros, 128, torch.float32))
    assert torch.equal(int_quant.matmul_int4(x, packed, scales4, zeros, 128, "torch"), expected)


def test_other_dtypes_take_the_torch_path() -> None:
    weight, x = random_weight(37, 96), random_x(3, 96, torch.float64)
    packed, scales, zeros = int_quant.quantize_int4(weight, 32)
    out = int_quant.matmul_int4(x, packed, scales, zeros, 32, "vnni")
    assert out.dtype == torch.float64
    assert torch.equal(out, F.linear(x, int_quant.dequantize_int4(packed, scales, zeros, 32, torch.float64)))


def test_environment_forces_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_INT_KERNEL", "torch")
    assert int_quant.default_path() == "torch"
    monkeypatch.setenv("PAGEDSERVE_INT_KERNEL", "fast")
    with pytest.raises(ValueError, match="PAGEDSERVE_INT_KERNEL"):
        int_quant.default_path()
    monkeypatch.delenv("PAGEDSERVE_INT_KERNEL")
    assert int_quant.default_path() == ("torch" if int_quant.load() is None else int_quant._native_path())


def test_group_size_must_divide_k_in_multiples_of_32() -> None:
    with pytest.raises(ValueError, match="group_size"):
        int_quant.quantize_int4(random_weight(4, 96), 64)
    with pytest.raises(ValueError, match="group_size"):
        int_quant.quantize_int4(random_weight(4, 96), 48)


def test_weights_a_kernel_would_misread_are_refused() -> None:
    weight, x = random_weight(37, 96), random_x(2, 96, torch.float32)
    packed, scales, zeros = int_quant.quantize_int4(weight, 32)
    with pytest.raises(ValueError, match="packed"):
        int_quant.matmul_int4(x, packed.int(), scales, zeros, 32)
    with pytest.raises(ValueError, match="scales and zeros"):
        int_quant.matmul_int4(x, packed, scales[:, :2], zeros, 32)
    qweight, scales8 = int_quant.quantize_int8(weight)
    with pytest.raises(ValueError, match="qweight"):
        int_quant.matmul_int8(x, qweight.short(), scales8)
    with pytest.raises(ValueError, match="qweight"):
        int_quant.matmul_int8(x[:, :64], qweight, scales8)
