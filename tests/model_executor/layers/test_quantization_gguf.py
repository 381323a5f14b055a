"""GGUF linear layers on the blocks as stored (quantization="gguf"): the kernels against dequantize-then-matmul in
float64 with a bound from the format's rounding, the fused layer, and the default model end to end."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

from pagedserve.model_executor.gguf_weights import QuantizedTensor, dequantize
from pagedserve.model_executor.layers.linear import LinearBase
from pagedserve.model_executor.layers.quantization import gguf_q4_q8
from pagedserve.model_executor.layers.quantization.gguf import GGUFEmbeddingMethod, GGUFLinearMethod

TYPES = (T.Q4_0, T.Q4_1, T.Q8_0)


def random_blocks(n: int, k: int, ggml_type: T, seed: int = 0) -> torch.Tensor:
    """A random float matrix quantized by gguf-py's reference quantizer: uint8 [n, bytes per row]."""
    w = np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32)
    return torch.from_numpy(quantize(w, ggml_type).reshape(n, -1)).contiguous()


def integer_part(blocks: torch.Tensor, ggml_type: T, n: int, k: int) -> torch.Tensor:
    """The part of each weight the kernel multiplies by int8 activations: w itself, or w - m for Q4_1."""
    w = dequantize(blocks.reshape(-1), ggml_type, (n, k)).double()
    if ggml_type == T.Q4_1:
        m = blocks.reshape(n, k // 32, 20)[:, :, 2:4].contiguous().view(torch.float16).double()
        w = (w.reshape(n, k // 32, 32) - m).reshape(n, k)
    return w


def error_bound(x: torch.Tensor, blocks: torch.Tensor, ggml_type: T, n: int, path: str) -> torch.Tensor:
    """|out - x W^T| may reach: the rounding of x where the VNNI GEMV runs (int8 steps of amax / 127 per 32-block,
    the remainder in steps of 1/128 of that: half of the finer step, times the integer part of the weights), bf16
    rounding of the weight (the AMX kernel and the dequantized matmul) and of the output in bf16, float sums."""
    m, k = x.shape
    xd = x.double()
    absprod = xd.abs() @ dequantize(blocks.reshape(-1), ggml_type, (n, k)).double().abs().T
    bound = 1e-5 * absprod
    if path == "vnni" and gguf_q4_q8.kernel(m, x.dtype, path) == "gemv":
        half_step = xd.reshape(m, k // 32, 32).abs().amax(-1) / (127 * 256)  # [m, blocks]
        w_int = integer_part(blocks, ggml_type, n, k).abs().reshape(n, k // 32, 32).sum(-1)  # [n, blocks]
        bound = bound + half_step @ w_int.T
    if x.dtype == torch.bfloat16:
        bound = bound + 2**-8 * absprod
    return bound


def check_matmul(ggml_type: T, n: int, k: int, m: int, path: str, dtype: torch.dtype) -> None:
    """matmul against x W^T in float64, W dequantized by gguf's reference, within error_bound."""
    blocks = random_blocks(n, k, ggml_type)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    ref = x.double() @ dequantize(blocks.reshape(-1), ggml_type, (n, k)).double().T
    out = gguf_q4_q8.matmul(x, blocks, ggml_type, n, path)
    assert out.dtype == dtype and out.shape == (m, n)
    error = (out.double() - ref).abs()
    bound = error_bound(x, blocks, ggml_type, n, path)
    assert (error <= bound).all(), f"worst error / bound {(error / bound).max():.3f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", gguf_q4_q8.PATHS)
# 2 | 3: the GEMV | AMX switch; 7: under one tile; 300: a tile and a tile pair short; 600: two 512-row passes
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 64, 300, 600])
@pytest.mark.parametrize("ggml_type", TYPES)
def test_matmul_against_float64(ggml_type: T, m: int, path: str, dtype: torch.dtype) -> None:
    # odd N (AMX: one full 32-row strip, then 5 rows); K = 7 blocks: an odd tail of blocks (VNNI pairs them)
    check_matmul(ggml_type, 37, 224, m, path, dtype)


@pytest.mark.parametrize("n, k, m", [(200, 576, 70), (96, 1536, 33)])
@pytest.mark.parametrize("ggml_type", TYPES)
def test_amx_kernel_on_model_shapes(ggml_type: T, n: int, k: int, m: int) -> None:
    """Several strips per thread (each dequantized while the one before is multiplied), K as in the default model."""
    if gguf_q4_q8.kernel(m, torch.bfloat16, "vnni") != "amx":
        pytest.skip("no AMX here: the bf16 batches take the dequantize + matmul path, tested above")
    check_matmul(ggml_type, n, k, m, "vnni", torch.bfloat16)


def test_vnni_is_built_here() -> None:
    """The machines this runs on have VNNI: the vnni cases above test the VNNI kernel, not its fallback."""
    flags = open("/proc/cpuinfo").read()
    if "avx512_vnni" not in flags:
        pytest.skip("no AVX512-VNNI on this CPU")
    assert gguf_q4_q8.default_path() == "vnni"


def test_amx_is_built_here() -> None:
    """Where the CPU has AMX, bf16 batches from MIN_AMX_ROWS rows on run on it (the cases above test the kernel)."""
    if "amx_bf16" not in open("/proc/cpuinfo").read():
        pytest.skip("no AMX-BF16 on this CPU")
    assert gguf_q4_q8.has_amx()
    assert gguf_q4_q8.kernel(gguf_q4_q8.MIN_AMX_ROWS, torch.bfloat16, "vnni") == "amx"
    assert gguf_q4_q8.kernel(gguf_q4_q8.MIN_AMX_ROWS - 1, torch.bfloat16, "vnni") == "gemv"
    assert gguf_q4_q8.kernel(64, torch.float32, "vnni") == "dequantize"
    assert gguf_q4_q8.kernel(64, torch.bfloat16, "portable") == "dequantize"


def test_the_portable_gemv_takes_up_to_its_measured_rows() -> None:
    rows = gguf_q4_q8.MAX_PORTABLE_GEMV_ROWS
    assert gguf_q4_q8.kernel(rows, torch.float32, "portable") == "gemv"
    assert gguf_q4_q8.kernel(rows + 1, torch.float32, "portable") == "dequantize"
    assert gguf_q4_q8.kernel(gguf_q4_q8.MAX_GEMV_ROWS + 1, torch.float32, "vnni") == "dequantize"


def test_forced_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_GGUF_KERNEL", "portable")
    assert gguf_q4_q8.default_path() == "portable"
    monkeypatch.setenv("PAGEDSERVE_GGUF_KERNEL", "fast")
    with pytest.raises(ValueError):
        gguf_q4_q8.default_path()


@pytest.mark.parametrize("m", [1, 16])
def test_fused_layer_with_bias(m: int) -> None:
    """A fused projection is its parts' block rows one after another: it computes each part's output."""
    k, sizes = 96, [40, 8, 8]
    parts = [random_blocks(rows, k, T.Q4_1, seed=i) for i, rows in enumerate(sizes)]
    layer = LinearBase(k, sum(sizes), True, local_sizes=sizes, quant_method=GGUFLinearMethod(T.Q4_1))
    bias = torch.randn(sum(sizes), dtype=torch.bfloat16)
    for shard, blocks in enumerate(parts):  # as the loader fills a fused layer, part by part
        layer.weight_loader("weight", QuantizedTensor(blocks, T.Q4_1), shard)
    layer.weight_loader("bias", bias, None)
    layer.to(torch.bfloat16)
    assert torch.equal(layer.blocks, torch.cat(parts))
    x = torch.randn(2, m, k, dtype=torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, m, sum(sizes))
    expected = torch.cat([gguf_q4_q8.matmul(x.reshape(-1, k), p, T.Q4_1, p.shape[0]) for p in parts], -1)
    torch.testing.assert_close(out, (expected + bias).view(2, m, -1))


# ----------------------------------------------------------------------------------------------------------
# The default model (SmolLM2-135M-Instruct, Q4_1)
# ----------------------------------------------------------------------------------------------------------

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    "'La dame de fer', it was constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
    "anniversary of the French Revolution. Although initially criticised by some of France's leading artists and "
    "intellectuals for its design, it has since become a global cultural icon of France."
)


def _argmax_per_position(quantization: str | None, ids: list[int], decode: bool) -> list[int]:
    """Teacher-forced greedy tokens at every position: one prefill of the whole text, or one decode step per
    token (the small-M kernel)."""
    from pagedserve.config import create_engine_config
    from pagedserve.engine_args import EngineArgs
    from pagedserve.model_executor.loader import load_model
    from pagedserve.model_executor.scoring import teacher_forced_logits

    config = create_engine_config(EngineArgs(quantization=quantization, dequantize_gguf=quantization is None,
                                             max_model_len=512))
    return teacher_forced_logits(load_model(config), ids, decode, config.dtype, config.device).argmax(-1).tolist()


def test_default_model_quantized_agrees_with_dequantized() -> None:
    from pagedserve.model_files import default_model_path
    from pagedserve.tokenizer import load_gguf_tokenizer

    ids = load_gguf_tokenizer(default_model_path())(TEXT).input_ids
    reference = _argmax_per_position(None, ids, decode=False)
    for decode in (True, False):
        tokens = _argmax_per_position("gguf", ids, decode)
        agreement = np.mean([a == b for a, b in zip(tokens, reference)])
        assert agreement >= 0.95, f"decode={decode}: top-1 agrees on {agreement:.1%} of {len(ids)} positions"


def test_default_model_quantized_says_paris() -> None:
    from pagedserve import LLM, SamplingParams

    llm = LLM(max_model_len=256, num_kv_blocks=32)  # a .gguf file runs on its blocks by default
    model = llm.engine.model_runner.model
    embedding = model.model.embed_tokens
    assert isinstance(embedding.quant_method, GGUFEmbeddingMethod)  # Q8_0 in the file, and the head tied to it
    assert isinstance(model.lm_head.quant_method, GGUFLinearMethod) and model.lm_head.blocks is embedding.blocks
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


def test_quantization_rejects_other_methods() -> None:
    from pagedserve.config import create_engine_config
    from pagedserve.engine_args import EngineArgs

    with pytest.raises(ValueError, match="quantization"):
        create_engine_config(EngineArgs(quantization="awq"))
