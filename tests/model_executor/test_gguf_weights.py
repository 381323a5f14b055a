"""Loading GGUF tensors, against gguf's reference dequantization and transformers' own GGUF loading."""

import os
import time

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize
from gguf_utils import finish, write_tiny_model

from pagedserve import gguf_file
from pagedserve.model_executor import gguf_weights as gw
from pagedserve.model_files import default_model_path, is_gguf_file
from pagedserve.tokenizer import load_gguf_tokenizer

DEFAULT = default_model_path()

pytestmark = pytest.mark.usefixtures("isolated_gguf_cache")


def _dequant(q: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    return gw.dequantize(torch.from_numpy(q.copy()).view(torch.uint8).reshape(-1), qtype, shape)


# -------------------------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0])
def test_dequant_matches_reference_on_quantized_data(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    data = (rng.standard_normal((48, 512)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
    q = ref_quantize(data, qtype)
    ours = _dequant(q, qtype, data.shape)
    ref = torch.from_numpy(ref_dequantize(q, qtype).reshape(data.shape))
    assert ours.dtype == torch.float32 and ours.shape == data.shape
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(("qtype", "f16_offsets"), [(T.Q4_K, (0, 2)), (T.Q5_K, (0, 2)), (T.Q6_K, (208,))])
def test_dequant_k_quants_match_reference_on_random_blocks(qtype: T, f16_offsets: tuple[int, ...]) -> None:
    # gguf cannot quantize K-quants, so feed random blocks with finite float16 scales
    block_size, type_size = gguf_file.block_format(qtype)
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, (64, type_size), dtype=np.uint8)
    for off in f16_offsets:
        blocks[:, off : off + 2] = rng.uniform(-0.1, 0.1, (64, 1)).astype(np.float16).view(np.uint8)
    shape = (8, 8 * block_size)
    ours = _dequant(blocks, qtype, shape)
    ref = torch.from_numpy(ref_dequantize(blocks.reshape(8, -1), qtype))
    assert torch.equal(ours, ref)


def test_dequant_matches_reference_on_every_type_in_default_model() -> None:
    header = gguf_file.read_gguf_header(DEFAULT)
    data = np.memmap(DEFAULT, dtype=np.uint8, mode="r")
    seen = set()
    for info in header.tensors:
        if info.ggml_type in seen or info.name.endswith((".attn_q.weight", ".attn_k.weight")):
            continue  # first tensor of each type; q/k are permuted by iter_gguf_tensors, not by dequantize
        seen.add(info.ggml_type)
        raw = np.asarray(data[info.offset : info.offset + info.nbytes])
        ref = ref_dequantize(raw.reshape(info.shape[0] if len(info.shape) > 1 else 1, -1), T(info.ggml_type))
        ours = gw.dequantize(torch.from_numpy(raw.copy()), info.ggml_type, info.shape)
        assert torch.equal(ours, torch.from_numpy(np.array(ref).reshape(info.shape))), info.name
    assert seen == {T.Q4_1, T.Q8_0, T.F32}


def test_dequant_rejects_unsupported_type() -> None:
    with pytest.raises(ValueError, match="IQ2_XXS"):
        gw.dequantize(torch.zeros(66, dtype=torch.uint8), T.IQ2_XXS, (256,))


# --------------------------------------------------------------------------------------------- default model


def test_tensors_equal_transformers(hf_model: torch.nn.Module) -> None:
    ref = hf_model.state_dict()
    ours = dict(gw.iter_gguf_tensors(DEFAULT, torch.float32))
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied: the head is the embedding
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), name


def test_tensors_in_bfloat16() -> None:
    it = gw.iter_gguf_tensors(DEFAULT, torch.bfloat16)
    name, tensor = next(it)
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (49152, 576)


def test_start_up_avoids_slow_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.integrations.gguf as transformers_gguf

    load_gguf_tokenizer(DEFAULT)  # warm the tokenizer cache; check only the steady-state start-up
    gguf_file._cached_header.cache_clear()

    def slow_path(*args, **kwargs):
        raise AssertionError("slow path taken")

    # gguf.GGUFReader takes seconds on this file; the warm tokenizer must not touch the GGUF at all
    monkeypatch.setattr(gguf.GGUFReader, "__init__", slow_path)
    monkeypatch.setattr(transformers_gguf, "get_gguf_tokenizer", slow_path)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    gguf_file.load_gguf_config(DEFAULT)
    for _ in gw.iter_gguf_tensors(DEFAULT, torch.float32):
        assert torch.get_num_threads() == threads  # the loader's single-threading does not leak out
    load_gguf_tokenizer(DEFAULT)
    # ~1.1 s on an idle 2-core machine, ~2 s under load; the bound only catches gross regressions
    assert time.perf_counter() - start < 30.0


# ------------------------------------------------------------------------------------------- synthetic files


@pytest.mark.parametrize(
    ("arch", "config_class", "tied", "q8_attention"),
    [
        ("llama", "LlamaConfig", True, True),
        ("llama", "LlamaConfig", False, False),
        ("qwen2", "Qwen2Config", False, False),
        ("qwen3", "Qwen3Config", True, True),
    ],
)
def test_tiny_models_match_hf_parameters(
    tmp_path: "os.PathLike[str]", arch: str, config_class: str, tied: bool, q8_attention: bool
) -> None:
    from transformers import AutoModelForCausalLM

    path = os.path.join(tmp_path, f"{arch}.gguf")
    expected = write_tiny_model(path, arch, tied=tied, q8_attention=q8_attention)

    cfg = gguf_file.load_gguf_config(path)
    assert type(cfg).__name__ == config_class
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 4, 2, 32)
    assert cfg.tie_word_embeddings is tied
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (5, 6, None)

    params = dict(AutoModelForCausalLM.from_config(cfg).named_parameters())
    ours = dict(gw.iter_gguf_tensors(path, torch.float32))
    assert set(ours) == set(params)
    for name, tensor in ours.items():
        assert tensor.shape == params[name].shape, name
        assert torch.equal(tensor, torch.from_numpy(expected[name])), name


# ---------------------------------------------------------------------------------------------------- errors


def test_unknown_architecture(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(tmp_path, "mamba.gguf")
    w = GGUFWriter(path, "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    finish(w)
    with pytest.raises(ValueError, match="'mamba'.*llama, qwen2, qwen3"):
        gguf_file.load_gguf_config(path)
    with pytest.raises(ValueError, match="mamba"):
        next(gw.iter_gguf_tensors(path, torch.float32))


def test_unsupported_tensor_type(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(tmp_path, "q2k.gguf")
    w = GGUFWriter(path, "llama")
    w.add_head_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 84), dtype=np.uint8), raw_dtype=T.Q2_K)
    finish(w)
    with pytest.raises(ValueError, match="Q2_K"):
        next(gw.iter_gguf_tensors(path, torch.float32))


def test_bad_files(tmp_path: "os.PathLike[str]") -> None:
    not_gguf = os.path.join(tmp_path, "not.gguf")
    with open(not_gguf, "wb") as f:
        f.write(b"PK\x03\x04" + bytes(100))
    missing = os.path.join(tmp_path, "missing.gguf")
    truncated_header = os.path.join(tmp_path, "truncated_header.gguf")
    truncated_data = os.path.join(tmp_path, "truncated_data.gguf")
    with open(DEFAULT, "rb") as src:
        head = src.read(2_000_000)  # the header (with the vocabulary) is ~1.8 MB of the 98 MB
    with open(truncated_header, "wb") as f:
        f.write(head[:4096])
    with open(truncated_data, "wb") as f:
        f.write(head)

    assert not any(is_gguf_file(p) for p in (not_gguf, missing, str(tmp_path)))
    assert is_gguf_file(truncated_header)
    for path in (not_gguf, missing, truncated_header, truncated_data):
        with pytest.raises(ValueError):
            gguf_file.load_gguf_config(path)
        with pytest.raises(ValueError):
            next(gw.iter_gguf_tensors(path, torch.float32))
    for path in (not_gguf, missing, truncated_header):
        with pytest.raises(ValueError):
            load_gguf_tokenizer(path)


def test_default_model_greedy_equals_transformers(hf_model: torch.nn.Module, hf_tokenizer) -> None:
    """End to end on the real default model: pagedserve's greedy tokens are transformers' on the same GGUF."""
    from pagedserve import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colors:"]
    llm = LLM(dtype="float32", dequantize_gguf=True, max_model_len=256, num_kv_blocks=64)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf_model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        assert out.outputs[0].token_ids == ref.tolist()
    assert "Paris" in outs[0].outputs[0].text
