"""Integer weights end to end on tiny random checkpoints: GPTQ / AWQ checkpoints packed here from known int4
values, and int8 / int4 quantization at load.

Each quantized model is compared with our float engine on a float checkpoint that holds exactly the weights the
quantized one means (q - zero) * scale: on the torch kernel path in float32 the two compute the same matmuls, so
greedy tokens are equal and log-probabilities agree to float rounding. The float engine itself is compared with
transformers in test_models_vs_transformers.py.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pagedserve import LLM, SamplingParams
from pagedserve.checkpoint_quantization import CheckpointQuantization
from pagedserve.config import EngineArgs, create_engine_config
from pagedserve.model_executor.layers.linear import LinearBase
from pagedserve.model_executor.layers.moe import FusedExperts
from pagedserve.model_executor.layers.quantization import gptq_awq, int_quant
from pagedserve.model_executor.layers.quantization.int_linear import (
    Int4CheckpointExperts,
    Int4CheckpointMethod,
    Int4Format,
    Int8Format,
    IntExpertsAtLoad,
    IntFormat,
    QuantizeAtLoad,
    int4_group_size,
)
from pagedserve.model_executor.layers.quantization.unquantized import (
    UnquantizedExpertsMethod,
    UnquantizedLinearMethod,
)
from pagedserve.model_executor.loader import load_model

MAX_TOKENS = 6
PROMPT_LENS = [1, 3, 7, 16, 17, 40, 90]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AWQ's nibble p holds column 8 j + AWQ_ORDER[p]
_NOT_QUANTIZED = re.compile(r"(\.gate|shared_expert_gate|norm|ln_\d)\.weight$")  # routers, norms stay float


def prompts(seed: int = 0, lens: list[int] = PROMPT_LENS) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(5, 512) for _ in range(n)]} for n in lens]


def generate(path: str, **engine_kwargs) -> list:
    llm = LLM(path, dtype="float32", max_model_len=256, num_kv_blocks=128, **engine_kwargs)
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                            logprobs=5)
    return [out.outputs[0] for out in llm.generate(prompts(), params, use_tqdm=False)]


def assert_same_outputs(outs: list, refs: list) -> None:
    """Equal greedy tokens; the top-5 log-probabilities of every step agree to 1e-4."""
    for out, ref in zip(outs, refs):
        assert out.token_ids == ref.token_ids
        for step, ref_step in zip(out.logprobs, ref.logprobs):
            assert step.keys() == ref_step.keys()
            for token, entry in step.items():
                assert entry.logprob == pytest.approx(ref_step[token].logprob, abs=1e-4)


def int_formats(layer: torch.nn.Module) -> list[IntFormat]:
    """The integer formats a layer's weights are quantized to at load (none for a float layer)."""
    if isinstance(layer, LinearBase) and isinstance(layer.quant_method, QuantizeAtLoad):
        return [layer.quant_method.format]
    if isinstance(layer, FusedExperts) and isinstance(layer.quant_method, IntExpertsAtLoad):
        return list(layer.quant_method.formats.values())
    return []


def float_linears(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules()
            if isinstance(m, LinearBase) and type(m.quant_method) is UnquantizedLinearMethod}


# ------------------------------------------------------------------------------------ writing checkpoints


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def is_projection(name: str, tensor: torch.Tensor) -> bool:
    """The linear weights a GPTQ / AWQ tool quantizes: 2-D weights of the decoder layers but routers."""
    return tensor.dim() == 2 and re.search(r"\.(layers|h)\.\d+\.", name) is not None and not _NOT_QUANTIZED.search(name)


def write_checkpoint(source: str, dest: str, tensors: dict[str, torch.Tensor], quantization_config=None) -> str:
    """`source`'s config and tokenizer with `tensors` as its weights (and a quantization_config if given)."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(source):
        if not name.endswith(".safetensors") and name != "config.json":
            shutil.copy(os.path.join(source, name), dest)
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dest, "model.safetensors"))
    return dest


def conv1d(name: str, source: str) -> bool:
    """GPT-2 stores its projections transposed ([in, out], transformers' Conv1D)."""
    return "gpt2" in os.path.basename(source) and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


def quantize_groups(
    w: torch.Tensor, g_idx: torch.Tensor, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Known int4 values for w [N, K] in groups `g_idx` [K]: q uint8 [N, K], scale fp16 [N, G], zero uint8 [N, G]
    (GPTQ's rule: each group's range widened to include 0; symmetric: zero 8)."""
    groups = int(g_idx.max()) + 1
    lo = torch.stack([w[:, g_idx == g].amin(1) for g in range(groups)], 1).clamp(max=0)
    hi = torch.stack([w[:, g_idx == g].amax(1) for g in range(groups)], 1).clamp(min=0)
    if sym:
        scale = (torch.maximum(-lo, hi) / 7).half()
        zero = torch.full_like(scale, 8, dtype=torch.uint8)
    else:
        scale = ((hi - lo) / 15).half()
        zero = torch.round(-lo / scale.float()).clamp(0, 15).to(torch.uint8)
    q = torch.round(w / scale.float()[:, g_idx]) + zero[:, g_idx]
    return q.clamp(0, 15).to(torch.uint8), scale, zero


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 8 m] -> int32 [..., m]: value 8 j + i in nibble i of word j (lowest bits first)."""
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, 8)
    words = sum(v[..., i] << (4 * i) for i in range(8))
    return torch.from_numpy(words.numpy().astype(np.uint32).view(np.int32))


def quantize_projection(w: torch.Tensor, method: str, group_size: int, sym: bool, checkpoint_format: str,
                        act_order: bool, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """w [N, K] -> (the checkpoint's tensors for it, the float weight they mean)."""
    n, k = w.shape
    size = k if group_size == -1 else group_size
    g_idx = torch.arange(k) // size
    if act_order:  # groups of inputs in a random order, as GPTQ's act-order leaves them
        g_idx = g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(seed))]
    w = w.float().clone()
    w[0, g_idx == 0] = w[0, g_idx == 0].abs()  # a group with zero 0: GPTQ v1 stores -1, read back as zero 16
    q, scale, zero = quantize_groups(w, g_idx, sym)
    read_zero = zero.int()
    if method == "gptq" and checkpoint_format == "gptq":
        stored_zero = (zero.int() - 1) & 0xF
        read_zero = stored_zero + 1
    else:
        stored_zero = zero.int()
    if method == "gptq" and sym:
        read_zero = torch.full_like(read_zero, 8)
    dequantized = (q.float() - read_zero.float()[:, g_idx]) * scale.float()[:, g_idx]
    tensors = pack_projection(q, scale, stored_zero, method)
    if method == "gptq":
        tensors["g_idx"] = g_idx.to(torch.int32)
    return tensors, dequantized


def pack_projection(q: torch.Tensor, scale: torch.Tensor, stored_zero: torch.Tensor, method: str) -> dict:
    """q [N, K], scale fp16 and zero as stored [N, G] -> the format's qweight, qzeros, scales."""
    n, k = q.shape
    if method == "gptq":
        return {"qweight": pack_nibbles(q).t(), "qzeros": pack_nibbles(stored_zero.t()), "scales": scale.t()}
    return {"qweight": pack_nibbles(q.t().reshape(k, -1, 8)[..., AWQ_ORDER].reshape(k, n)),
            "qzeros": pack_nibbles(stored_zero.t().reshape(-1, n // 8, 8)[..., AWQ_ORDER].reshape(-1, n)),
            "scales": scale.t()}


def make_gptq_awq(source: str, root: str, method: str, group_size: int = 32, sym: bool = False,
                  checkpoint_format: str = "gptq", desc_act: bool = False) -> tuple[str, str]:
    """(a GPTQ / AWQ checkpoint of `source`'s model, a float checkpoint of the weights it means)."""
    quantized, reference = {}, {}
    for i, (name, w) in enumerate(read_tensors(source).items()):
        if not is_projection(name, w):
            quantized[name] = reference[name] = w
            continue
        transposed = conv1d(name, source)
        parts, dequantized = quantize_projection(w.t() if transposed else w, method, group_size, sym,
                                                 checkpoint_format, desc_act, seed=i)
        prefix = name.removesuffix(".weight")
        quantized.update({f"{prefix}.{suffix}": t for suffix, t in parts.items()})
        reference[name] = dequantized.t() if transposed else dequantized
    if method == "gptq":
        config = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": sym, "desc_act": desc_act,
                  "checkpoint_format": checkpoint_format}
    else:
        config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return (write_checkpoint(source, os.path.join(root, "quantized"), quantized, config),
            write_checkpoint(source, os.path.join(root, "reference"), reference))


def make_int_reference(source: str, dest: str, method: str) -> str:
    """A float checkpoint of the weights `quantization=method` turns `source`'s into (int_quant's quantizers)."""
    tensors = read_tensors(source)
    for name, w in tensors.items():
        if not is_projection(name, w):
            continue
        w = w.t() if conv1d(name, source) else w
        if method == "int8":
            dequantized = int_quant.dequantize_int8(*int_quant.quantize_int8(w), torch.float32)
        else:
            group_size = int4_group_size(w.shape[1])
            assert group_size is not None
            dequantized = int_quant.dequantize_int4(*int_quant.quantize_int4(w, group_size), group_size, torch.float32)
        tensors[name] = dequantized.t() if conv1d(name, source) else dequantized
    return write_checkpoint(source, dest, tensors)


# ------------------------------------------------------------------------------------ GPTQ / AWQ

# Golden packings from vLLM's own helpers (utils/quant_utils.py: gptq_pack / pack_cols / awq_pack) for
# q[k, n] = (3 k + 5 n) % 16 (K = 16, N = 8) and zero[g, n] = (7 g + 3 n) % 16 (2 groups)
VLLM_GPTQ_QWEIGHT = [[1392285232, -1488852091, -57265958, 1105954095, -1775183244, -343593015, 819622942, -2060465821],
                     [-629924168, 801727245, 1948170322, -916255321, 515396348, 1661839169, -1202520938, 229065195]]
VLLM_GPTQ_QZEROS = [[1392285232], [-916255321]]
VLLM_AWQ_QWEIGHT = [972416160, 1814566867, -1621407226, -1030849223, -172908436, 686085023, 1528235714, -1907738123,
                    -1317180376, -459235493, 399753870, 1241970097, 2100898020, -1603511529, -744518070, 113422717]
VLLM_AWQ_QZEROS = [1603480672, -972385321]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_layouts_match_vllms_packing(method):
    """Our reading of each format (and this file's writer) against vLLM's packing of the same values."""
    q = ((torch.arange(16)[:, None] * 3 + torch.arange(8) * 5) % 16).to(torch.uint8)  # [K, N]
    zero = ((torch.arange(2)[:, None] * 7 + torch.arange(8) * 3) % 16).to(torch.uint8)  # [groups, N]
    scale = torch.rand(8, 2, generator=torch.Generator().manual_seed(0)).half()
    parts = pack_projection(q.t(), scale, zero.t(), method)
    if method == "gptq":
        qweight, qzeros = torch.tensor(VLLM_GPTQ_QWEIGHT), torch.tensor(VLLM_GPTQ_QZEROS)
    else:
        qweight, qzeros = torch.tensor(VLLM_AWQ_QWEIGHT).view(16, 1), torch.tensor(VLLM_AWQ_QZEROS).view(2, 1)
    assert torch.equal(parts["qweight"], qweight.int()) and torch.equal(parts["qzeros"], qzeros.int())
    quant = CheckpointQuantization(method, 8, symmetric=False, act_order=False, zero_offset=0)
    rows = gptq_awq.convert_projection(quant, "x", parts)
    assert isinstance(rows, gptq_awq.Int4Rows)
    assert torch.equal(rows.packed, int_quant.pack_int4(q.t().contiguous()))
    assert torch.equal(rows.zeros, zero.t()) and torch.equal(rows.scales, scale.float())


VARIANTS = {  # id -> (architecture, make_gptq_awq options)
    "gptq-v1-asym-g32": ("llama", dict(method="gptq")),
    "gptq-v1-sym-g64": ("llama", dict(method="gptq", group_size=64, sym=True)),
    "gptq-v2-asym-per-row": ("llama", dict(method="gptq", group_size=-1, checkpoint_format="gptq_v2")),
    "gptq-act-order": ("llama", dict(method="gptq", desc_act=True)),
    "awq-g64": ("llama", dict(method="awq", group_size=64)),
    "awq-mixtral": ("mixtral", dict(method="awq")),
    "gptq-v2-qwen2-moe": ("qwen2-moe", dict(method="gptq", checkpoint_format="gptq_v2")),
    "gptq-gpt2": ("gpt2", dict(method="gptq")),
}


@pytest.fixture(scope="module")
def packed(checkpoints, tmp_path_factory) -> dict[str, tuple[str, str]]:
    root = tmp_path_factory.mktemp("gptq_awq")
    return {variant: make_gptq_awq(checkpoints[arch], str(root / variant), **options)
            for variant, (arch, options) in VARIANTS.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkpoint_matches_its_dequantized_weights(packed, variant, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_INT_KERNEL", "torch")
    quantized, reference = packed[variant]
    assert_same_outputs(generate(quantized), generate(reference))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkpoint_layers_are_int4(packed, variant):
    """Every decoder projection is built with the int4 checkpoint method (MoE experts too), detected from config.json;
    under act-order (no kernel) they are float."""
    config = create_engine_config(EngineArgs(packed[variant][0], dtype="float32"))
    assert config.quantization == VARIANTS[variant][1]["method"]
    model = load_model(config)
    int4 = [m for m in model.modules()
            if isinstance(m, LinearBase) and isinstance(m.quant_method, Int4CheckpointMethod)]
    if VARIANTS[variant][1].get("desc_act"):
        assert not int4
        return
    experts = [m.quant_method for m in model.modules() if isinstance(m, FusedExperts)]
    assert int4 and not any(isinstance(method, UnquantizedExpertsMethod) for method in experts)
    assert all(name == "lm_head" or name.endswith("gate") for name in float_linears(model)), float_linears(model)
    if VARIANTS[variant][0] in ("mixtral", "qwen2-moe"):
        assert experts and all(isinstance(method, Int4CheckpointExperts) for method in experts)


@pytest.mark.parametrize("variant", ["gptq-v1-asym-g32", "awq-mixtral"])
def test_native_kernel_agrees_with_the_dequantized_model(packed, variant):
    """The default path (VNNI quantizes the activations, as llama.cpp): greedy tokens equal the float model's on
    at least 90% of the positions. Measured float32: 42 / 42 on both (bf16, not tested: 83-90%)."""
    outs, refs = (generate(path) for path in packed[variant])
    equal = sum(a == b for out, ref in zip(outs, refs) for a, b in zip(out.token_ids, ref.token_ids))
    assert equal >= 0.9 * len(outs) * MAX_TOKENS, equal


def quantized_dir(packed, tmp_path, variant: str, edit) -> str:
    """A copy of a packed checkpoint with `edit` applied to (tensors, quantization_config)."""
    source = packed[variant][0]
    tensors = read_tensors(source)
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)["quantization_config"]
    edit(tensors, config)
    return write_checkpoint(source, str(tmp_path / "edited"), tensors, config)


def test_bits_other_than_4_are_refused(packed, tmp_path):
    path = quantized_dir(packed, tmp_path, "gptq-v1-asym-g32", lambda tensors, config: config.update(bits=8))
    with pytest.raises(ValueError, match="bits=8"):
        create_engine_config(EngineArgs(path))


def test_missing_qzeros_is_an_error(packed, tmp_path):
    path = quantized_dir(packed, tmp_path, "awq-g64",
                         lambda tensors, config: tensors.pop("model.layers.1.mlp.down_proj.qzeros"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj has no qzeros"):
        LLM(path, dtype="float32", max_model_len=64, num_kv_blocks=8)


def test_groups_out_of_order_need_desc_act(packed, tmp_path):
    path = quantized_dir(packed, tmp_path, "gptq-act-order", lambda tensors, config: config.update(desc_act=False))
    with pytest.raises(ValueError, match="g_idx is not in order although desc_act is false"):
        LLM(path, dtype="float32", max_model_len=64, num_kv_blocks=8)


def test_a_missing_expert_projection_is_named(packed, tmp_path):
    def drop(tensors, config):
        for suffix in ("qweight", "qzeros", "scales"):
            del tensors[f"model.layers.1.block_sparse_moe.experts.5.w3.{suffix}"]

    path = quantized_dir(packed, tmp_path, "awq-mixtral", drop)
    with pytest.raises(ValueError, match=r"missing weights.*model\.layers\.1\.mlp\.experts\.gate_up_proj@5#1"):
        LLM(path, dtype="float32", max_model_len=64, num_kv_blocks=8)


def test_quantization_must_match_the_checkpoint(packed, llama_dir):
    with pytest.raises(ValueError, match="quantized with 'gptq'"):
        create_engine_config(EngineArgs(packed["gptq-v1-asym-g32"][0], quantization="awq"))
    with pytest.raises(ValueError, match="quantized with 'awq'"):
        create_engine_config(EngineArgs(packed["awq-g64"][0], quantization="int8"))
    assert create_engine_config(EngineArgs(packed["awq-g64"][0], quantization="awq")).quantization == "awq"
    with pytest.raises(ValueError, match="has none"):
        create_engine_config(EngineArgs(llama_dir, quantization="gptq"))


# ------------------------------------------------------------------------------------ quantized at load


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2-moe", "gpt2"])
def test_quantized_at_load_matches_its_dequantized_weights(checkpoints, tmp_path, monkeypatch, arch, method):
    monkeypatch.setenv("PAGEDSERVE_INT_KERNEL", "torch")
    reference = make_int_reference(checkpoints[arch], str(tmp_path / "reference"), method)
    assert_same_outputs(generate(checkpoints[arch], quantization=method), generate(reference))


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_quantized_at_load_swaps_layers_and_shrinks_them(checkpoints, arch, method):
    float_model = load_model(create_engine_config(EngineArgs(checkpoints[arch], dtype="float32")))
    model = load_model(create_engine_config(EngineArgs(checkpoints[arch], dtype="float32", quantization=method)))
    kind = Int8Format if method == "int8" else Int4Format

    def quantized_layer(m: torch.nn.Module) -> bool:
        formats = int_formats(m)
        return bool(formats) and all(isinstance(f, kind) for f in formats)

    floats = float_linears(model)
    assert floats == {"lm_head"} | {n for n in floats if n.endswith(".mlp.gate")}  # the head and MoE routers
    assert not any(isinstance(m, FusedExperts) and not quantized_layer(m) for m in model.modules())
    assert any(quantized_layer(m) for m in model.modules())

    quantized = sum(b.numel() * b.element_size() for m in model.modules() if quantized_layer(m) for b in m.buffers())
    weights = [p for name, m in float_model.named_modules() if isinstance(m, FusedExperts) for p in m.parameters()]
    weights += [m.weight for name, m in float_model.named_modules()
                if isinstance(m, LinearBase) and name != "lm_head" and not name.endswith(".mlp.gate")]
    ratio = quantized / sum(w.numel() * w.element_size() for w in weights)
    assert ratio < (0.27 if method == "int8" else 0.17), ratio  # float32 -> 1 byte (+ scales) / half a byte


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_quantized_at_load_stays_close_to_float(checkpoints, arch, method):
    """On the default (native) path, the first step of each prompt (no earlier divergence to inherit): int8 picks
    the float model's token on all but at most one prompt (measured: 7 / 7 on both); int4 keeps it among its top 5
    on most (measured 5 / 7 Llama, 6 / 7 Mixtral: these random weights make every layer amplify the ~10% int4
    weight noise; the per-layer error is bounded in layers/test_quantization_int_linear.py)."""
    outs, refs = generate(checkpoints[arch], quantization=method), generate(checkpoints[arch])
    if method == "int8":
        assert sum(out.token_ids[0] == ref.token_ids[0] for out, ref in zip(outs, refs)) >= len(outs) - 1
    else:
        assert sum(ref.token_ids[0] in out.logprobs[0] for out, ref in zip(outs, refs)) > len(outs) // 2
