"""GGUF K-quant linear layers (Q4_K, Q5_K, Q6_K) on the blocks as stored: the native dequantizer against gguf-py's,
the kernels against gguf-py's dequantize then a float64 matmul with a bound from the activation rounding, and the
layer dispatching to them."""

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import dequantize as reference_dequantize

from pagedserve.gguf_file import block_format
from pagedserve.model_executor.gguf_weights import QuantizedTensor
from pagedserve.model_executor.layers.linear import LinearBase
from pagedserve.model_executor.layers.quantization import gguf_kquants
from pagedserve.model_executor.layers.quantization.gguf import KERNEL_TYPES, GGUFLinearMethod, GGUFPartsMethod

TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)
N, K = 37, 768  # odd N; K three super-blocks: a multiple of 256 that is not a power of two


def random_blocks(n: int, k: int, ggml_type: T, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """uint8 [n, bytes per row] of random blocks (gguf-py has no K-quant quantizer): random bytes for the quantized
    bits and for the scales (any 12 bytes are 8 valid six-bit scales and 8 mins; Q6_K's are any int8), and small
    positive float16 d and dmin (times `scale`), so that every weight is finite."""
    rng = np.random.default_rng(seed)
    n_blocks = k // 256
    blocks = rng.integers(0, 256, (n, n_blocks, block_format(ggml_type)[1]), dtype=np.uint8)

    def halves() -> np.ndarray:
        return (scale * rng.uniform(1e-3, 4e-3, (n, n_blocks, 1))).astype(np.float16).view(np.uint8)

    if ggml_type == T.Q6_K:
        blocks[..., 208:210] = halves()
    else:
        blocks[..., 0:2], blocks[..., 2:4] = halves(), halves()
    return torch.from_numpy(blocks.reshape(n, -1))


def reference_weight(blocks: torch.Tensor, ggml_type: T, n: int, k: int) -> torch.Tensor:
    """gguf-py's dequantization, in float64."""
    return torch.from_numpy(reference_dequantize(blocks.numpy(), ggml_type).reshape(n, k)).double()


def integer_part(blocks: torch.Tensor, ggml_type: T, n: int, k: int) -> torch.Tensor:
    """The part of each weight the kernel multiplies by int8 activations: d * scale * q for Q4_K / Q5_K (the
    dmin * min term uses exact float sums of the activations: the weight with dmin set to 0), all of it for Q6_K."""
    if ggml_type != T.Q6_K:
        blocks = blocks.reshape(n, k // 256, -1).clone()
        blocks[..., 2:4] = 0  # float16 +0
    return reference_weight(blocks.reshape(n, -1), ggml_type, n, k)


def error_bound(x: torch.Tensor, blocks: torch.Tensor, ggml_type: T, n: int, path: str) -> torch.Tensor:
    """|out - x W^T| may reach: float sums (1e-5 of sum |x| |w|); on the VNNI GEMV (`kernel`), the rounding of x to
    d_x (q1 + q2 / 128) with d_x = amax / 127 per 32-weight sub-block, q1 = round(x / d_x) and q2 the remainder
    rounded in steps of d_x / 128, so |x - its rounding| <= d_x / 256, times the integer part of the weights it
    multiplies; in bfloat16, the rounding of the weight (batched paths) and of the output, 2^-9 each."""
    m, k = x.shape
    xd = x.double()
    absprod = xd.abs() @ reference_weight(blocks, ggml_type, n, k).abs().T
    bound = 1e-5 * absprod
    if path == "vnni" and gguf_kquants.kernel(m, x.dtype, path) == "gemv":
        half_step = xd.reshape(m, k // 32, 32).abs().amax(-1) / (127 * 256)  # [m, sub-blocks]
        w_int = integer_part(blocks, ggml_type, n, k).abs().reshape(n, k // 32, 32).sum(-1)  # [n, sub-blocks]
        bound = bound + half_step @ w_int.T
    if x.dtype == torch.bfloat16:
        bound = bound + 2**-8 * absprod
    return bound


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_matches_gguf_py(ggml_type: T) -> None:
    """Float32 exactly as gguf-py (w = scale * q + offset is exact before its one rounding); bfloat16 its rounding."""
    blocks = random_blocks(N, K, ggml_type)
    reference = reference_weight(blocks, ggml_type, N, K).float()
    assert torch.equal(gguf_kquants.dequantize(blocks, ggml_type, N, K, torch.float32), reference)
    assert torch.equal(gguf_kquants.dequantize(blocks, ggml_type, N, K, torch.bfloat16), reference.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", gguf_kquants.PATHS)
# 1, 3: the GEMV; 7: the AMX kernel (bf16) under one tile; 16, 64: whole tiles; 300: a partial tile; 600: above
# the AMX range (dequantize + matmul)
@pytest.mark.parametrize("m", [1, 3, 7, 16, 64, 300, 600])
@pytest.mark.parametrize("ggml_type", TYPES)
def test_matmul_against_float64(ggml_type: T, m: int, path: str, dtype: torch.dtype) -> None:
    blocks = random_blocks(N, K, ggml_type)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(dtype)
    ref = x.double() @ reference_weight(blocks, ggml_type, N, K).T
    out = gguf_kquants.matmul(x, blocks, ggml_type, N, path)
    assert out.dtype == dtype and out.shape == (m, N)
    error = (out.double() - ref).abs()
    bound = error_bound(x, blocks, ggml_type, N, path)
    assert (error <= bound).all(), f"worst error / bound {(error / bound).max():.3f}"


def test_vnni_is_built_here() -> None:
    """The machines this runs on have VNNI: the vnni cases above test the VNNI kernel, not its fallback."""
    if "avx512_vnni" not in open("/proc/cpuinfo").read():
        pytest.skip("no AVX512-VNNI on this CPU")
    library = gguf_kquants.load()
    assert library is not None and library.gguf_kquants_has_vnni()


def needs_amx_kernel(m: int) -> None:
    if gguf_kquants.kernel(m, torch.bfloat16, "vnni") != "amx":
        pytest.skip("no AMX here: bf16 batches take the GEMV or dequantize + matmul path, tested above")


@pytest.mark.parametrize("ggml_type", TYPES)
def test_amx_kernel_dequantizes_as_the_dequantizer(ggml_type: T) -> None:
    """The weights the AMX kernel multiplies are the native dequantizer's bf16 values bit for bit (batches add no
    rounding of their own): x = rows of the identity picks single weights, each sum has one nonzero term, exact."""
    needs_amx_kernel(256)
    blocks = random_blocks(N, K, ggml_type)
    identity = torch.eye(K, dtype=torch.bfloat16)
    picked = torch.cat([gguf_kquants.matmul(rows, blocks, ggml_type, N, "vnni") for rows in identity.split(256)])
    assert torch.equal(picked.T, gguf_kquants.dequantize(blocks, ggml_type, N, K, torch.bfloat16))


def test_amx_kernel_is_taken() -> None:
    """bf16 batches of MIN_AMX_ROWS to MAX_AMX_ROWS rows on the vnni path run on AMX; fewer on the GEMV, more (and
    float32, and the portable path) dequantize + matmul."""
    needs_amx_kernel(gguf_kquants.MIN_AMX_ROWS)
    kernel, low, high = gguf_kquants.kernel, gguf_kquants.MIN_AMX_ROWS, gguf_kquants.MAX_AMX_ROWS
    assert [kernel(m, torch.bfloat16, "vnni") for m in (low - 1, low, 300, high, high + 1)] == [
        "gemv", "amx", "amx", "amx", "dequantize"
    ]
    assert kernel(64, torch.float32, "vnni") == kernel(64, torch.bfloat16, "portable") == "dequantize"


def test_amx_is_built_here() -> None:
    """Where the CPU has AMX, bf16 batches from MIN_AMX_ROWS rows on run on it (the cases above test the kernel)."""
    if "amx_bf16" not in open("/proc/cpuinfo").read():
        pytest.skip("no AMX-BF16 on this CPU")
    assert gguf_kquants.has_amx()


def test_forced_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """PAGEDSERVE_GGUF_KERNEL picks this family's path too: the portable loop's result, not the VNNI kernel's (which
    rounds the activations differently)."""
    blocks, x = random_blocks(N, K, T.Q4_K), torch.randn(1, K)
    portable = gguf_kquants.matmul(x, blocks, T.Q4_K, N, "portable")
    if torch.equal(portable, gguf_kquants.matmul(x, blocks, T.Q4_K, N, "vnni")):
        pytest.skip("no VNNI kernel on this CPU: the two paths are the same loop, nothing tells them apart")
    monkeypatch.setenv("PAGEDSERVE_GGUF_KERNEL", "portable")
    assert torch.equal(gguf_kquants.matmul(x, blocks, T.Q4_K, N), portable)


@pytest.mark.parametrize("m", [1, 16])
def test_fused_layer_with_bias(m: int) -> None:
    """GGUF blocks of K-quants run on this family's kernel; a fused projection computes each part's output."""
    assert {T.Q4_0, T.Q4_1, T.Q8_0, *TYPES} <= KERNEL_TYPES
    sizes = [40, 8, 8]
    parts = [random_blocks(rows, K, T.Q6_K, seed=i) for i, rows in enumerate(sizes)]
    layer = LinearBase(K, sum(sizes), True, local_sizes=sizes, quant_method=GGUFLinearMethod(T.Q6_K))
    bias = torch.randn(sum(sizes), dtype=torch.bfloat16)
    for shard, blocks in enumerate(parts):  # as the loader fills a fused layer, part by part
        layer.weight_loader("weight", QuantizedTensor(blocks, T.Q6_K), shard)
    layer.weight_loader("bias", bias, None)
    layer.to(torch.bfloat16)
    x = torch.randn(2, m, K, dtype=torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, m, sum(sizes))
    expected = torch.cat([gguf_kquants.matmul(x.reshape(-1, K), p, T.Q6_K, p.shape[0]) for p in parts], -1)
    torch.testing.assert_close(out, (expected + bias).view(2, m, -1))


def test_layer_rejects_rows_that_are_not_whole_super_blocks() -> None:
    """576 (SmolLM2's hidden size) is a multiple of Q4_1's 32 but not of a K-quant's 256."""
    with pytest.raises(ValueError, match="block size 256"):
        LinearBase(576, 64, True, quant_method=GGUFLinearMethod(T.Q4_K))


# ----------------------------------------------------------------------------------------------------------
# End to end: a tiny llama GGUF whose linear weights are K-quants
# ----------------------------------------------------------------------------------------------------------


def _write_kquant_model(path: str, v_type: T = T.Q4_K) -> None:
    """Two llama layers, hidden 256 (one super-block): q/k and gate/up Q4_K, v `v_type` (Q6_K as in a Q4_K_M file:
    a fused q/k/v of mixed types), o Q5_K, down Q6_K (a fused layer of each family, every format), float32
    embeddings and norms (tied head). The blocks are random with d and dmin
    scaled down (partly float16 subnormals) so that weights are ~0.05, as in a trained model."""
    hidden, inter, heads, kv_heads, head_dim, vocab = 256, 512, 4, 2, 64, 96
    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_rope_freq_base(1e4)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    writer.add_tensor("token_embd.weight", rng.standard_normal((vocab, hidden)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    linears = {
        "attn_q": (heads * head_dim, hidden, T.Q4_K),
        "attn_k": (kv_heads * head_dim, hidden, T.Q4_K),
        "attn_v": (kv_heads * head_dim, hidden, v_type),
        "attn_output": (hidden, heads * head_dim, T.Q5_K),
        "ffn_gate": (inter, hidden, T.Q4_K),
        "ffn_up": (inter, hidden, T.Q4_K),
        "ffn_down": (hidden, inter, T.Q6_K),
    }
    for layer in range(2):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(hidden, dtype=np.float32))
        for i, (name, (rows, cols, ggml_type)) in enumerate(linears.items()):
            blocks = random_blocks(rows, cols, ggml_type, seed=10 * layer + i, scale=0.03).numpy()
            writer.add_tensor(f"blk.{layer}.{name}.weight", blocks, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _logits_per_position(path: str, quantization: str | None, ids: list[int], decode: bool,
                         mixed: bool = False) -> torch.Tensor:
    """Teacher-forced float32 logits at every position: one prefill of all of `ids` (the batched path), or one
    decode step per token (the M = 1 kernel)."""
    from pagedserve.config import create_engine_config
    from pagedserve.engine_args import EngineArgs
    from pagedserve.model_executor.loader import load_model
    from pagedserve.model_executor.scoring import teacher_forced_logits

    config = create_engine_config(EngineArgs(model=path, quantization=quantization, dtype="float32",
                                             dequantize_gguf=quantization is None, max_model_len=256))
    model = load_model(config)
    methods = [type(m.quant_method) for m in model.modules() if isinstance(m, LinearBase)]
    on_blocks = [m for m in methods if m in (GGUFLinearMethod, GGUFPartsMethod)]
    assert len(on_blocks) == (8 if quantization == "gguf" else 0)  # per layer: qkv, o, gate/up, down
    assert (GGUFPartsMethod in methods) == (mixed and quantization == "gguf")
    return teacher_forced_logits(model, ids, decode, config.dtype, config.device)


@pytest.mark.parametrize("v_type", [T.Q4_K, T.Q6_K], ids=["uniform", "mixed-qkv"])
def test_kquant_model_end_to_end(tmp_path: "os.PathLike[str]", v_type: T) -> None:
    """quantization="gguf" keeps every K-quant linear on the blocks (a q/k/v of mixed types with GGUFPartsMethod) and
    predicts as the dequantized model: the same
    greedy token at every position (the closest top-2 gap is 0.34 here), logits as close as the activation rounding
    of the decode kernel allows (up to 1/(127 * 256) of a sub-block's largest value per matmul, through two layers:
    measured 7e-4 of the largest logit; exact on the batched path)."""
    path = os.path.join(tmp_path, "kquants.gguf")
    _write_kquant_model(path, v_type)
    ids = np.random.default_rng(1).integers(0, 96, 40).tolist()
    reference = _logits_per_position(path, None, ids, decode=False)
    for decode in (True, False):
        logits = _logits_per_position(path, "gguf", ids, decode, mixed=v_type != T.Q4_K)
        assert torch.equal(logits.argmax(-1), reference.argmax(-1)), f"decode={decode}"
        torch.testing.assert_close(logits, reference, rtol=0, atol=2e-3 * reference.abs().max().item())
