"""Tests for the GGUF loader, against gguf's reference dequantization and transformers' own GGUF loading."""

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

from pagedserve.model_executor import gguf_loader as gl
from pagedserve.model_files import default_model_path, is_gguf_file

DEFAULT = default_model_path()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path_factory.getbasetemp() / "pagedserve-cache"))


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    """SmolLM2 as loaded by transformers itself (slow: ~20 s, so once per module)."""
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(DEFAULT)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    directory, name = os.path.split(DEFAULT)
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


def _dequant(q: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    return gl.dequantize(torch.from_numpy(q.copy()).view(torch.uint8).reshape(-1), qtype, shape)


# ------------------------------------------------------------------------------------------- dequantization


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
    block_size, type_size = gl._BLOCK_FORMATS[qtype][:2]
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, (64, type_size), dtype=np.uint8)
    for off in f16_offsets:
        blocks[:, off : off + 2] = rng.uniform(-0.1, 0.1, (64, 1)).astype(np.float16).view(np.uint8)
    shape = (8, 8 * block_size)
    ours = _dequant(blocks, qtype, shape)
    ref = torch.from_numpy(ref_dequantize(blocks.reshape(8, -1), qtype))
    assert torch.equal(ours, ref)


def test_dequant_matches_reference_on_every_type_in_default_model() -> None:
    header = gl.read_gguf_header(DEFAULT)
    data = np.memmap(DEFAULT, dtype=np.uint8, mode="r")
    seen = set()
    for info in header.tensors:
        if info.ggml_type in seen or info.name.endswith((".attn_q.weight", ".attn_k.weight")):
            continue  # first tensor of each type; q/k are permuted by iter_gguf_tensors, not by dequantize
        seen.add(info.ggml_type)
        raw = np.asarray(data[info.offset : info.offset + info.nbytes])
        ref = ref_dequantize(raw.reshape(info.shape[0] if len(info.shape) > 1 else 1, -1), T(info.ggml_type))
        ours = gl.dequantize(torch.from_numpy(raw.copy()), info.ggml_type, info.shape)
        assert torch.equal(ours, torch.from_numpy(np.array(ref).reshape(info.shape))), info.name
    assert seen == {T.Q4_1, T.Q8_0, T.F32}


def test_dequant_rejects_unsupported_type() -> None:
    with pytest.raises(ValueError, match="IQ2_XXS"):
        gl.dequantize(torch.zeros(66, dtype=torch.uint8), T.IQ2_XXS, (256,))


# ---------------------------------------------------------------------------------------------- default model


def test_config_of_default_model() -> None:
    cfg = gl.load_gguf_config(DEFAULT)
    assert type(cfg).__name__ == "LlamaConfig"
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rope_parameters["rope_type"] == "default"
    assert cfg.max_position_embeddings == 8192
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)


def test_config_matches_transformers(hf_model: torch.nn.Module) -> None:
    ours, ref = gl.load_gguf_config(DEFAULT), hf_model.config
    for field in (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
        "head_dim rms_norm_eps max_position_embeddings rope_parameters tie_word_embeddings "
        "bos_token_id eos_token_id pad_token_id model_type"
    ).split():
        assert getattr(ours, field) == getattr(ref, field), field


def test_config_rope_scaling_and_missing_keys(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(tmp_path, "yarn.gguf")
    scaling = {"type": "yarn", "factor": 4.0, "original_context_length": 128}
    extra_kv = {f"qwen2.rope.scaling.{key}": value for key, value in scaling.items()}
    _write_tiny_model(path, "qwen2", tied=True, q8_attention=False, extra_kv=extra_kv)
    expected = {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    assert gl.load_gguf_config(path).rope_parameters == expected

    path = os.path.join(tmp_path, "incomplete.gguf")
    w = GGUFWriter(path, "llama")
    w.add_embedding_length(64)
    _finish(w)
    with pytest.raises(ValueError, match="llama.attention.head_count"):
        gl.load_gguf_config(path)


def test_tensors_equal_transformers(hf_model: torch.nn.Module) -> None:
    ref = hf_model.state_dict()
    ours = dict(gl.iter_gguf_tensors(DEFAULT, torch.float32))
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied: the head is the embedding
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), name


def test_tensors_in_bfloat16() -> None:
    it = gl.iter_gguf_tensors(DEFAULT, torch.bfloat16)
    name, tensor = next(it)
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (49152, 576)


def test_start_up_avoids_slow_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.integrations.gguf as transformers_gguf

    gl.load_gguf_tokenizer(DEFAULT)  # warm the tokenizer cache; check only the steady-state start-up
    gl._cached_header.cache_clear()

    def slow_path(*args, **kwargs):
        raise AssertionError("slow path taken")

    # gguf.GGUFReader takes seconds on this file; the warm tokenizer must not touch the GGUF at all
    monkeypatch.setattr(gguf.GGUFReader, "__init__", slow_path)
    monkeypatch.setattr(transformers_gguf, "get_gguf_tokenizer", slow_path)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    gl.load_gguf_config(DEFAULT)
    for _ in gl.iter_gguf_tensors(DEFAULT, torch.float32):
        assert torch.get_num_threads() == threads  # the loader's single-threading does not leak out
    gl.load_gguf_tokenizer(DEFAULT)
    # ~1.1 s on an idle 2-core machine, ~2 s under load; the bound only catches gross regressions
    assert time.perf_counter() - start < 30.0


# ---------------------------------------------------------------------------------------------- tokenizer


_TEXTS = ["Hello world! How are you?", "  leading spaces\tand\ttabs\n\nnew lines", "naïve café — 東京 🤖", ""]


def test_tokenizer_matches_transformers(hf_tokenizer) -> None:
    tok = gl.load_gguf_tokenizer(DEFAULT)
    for text in _TEXTS:
        assert tok(text)["input_ids"] == hf_tokenizer(text)["input_ids"], text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.chat_template == hf_tokenizer.chat_template
    assert tok.chat_template == gl.read_gguf_header(DEFAULT).metadata["tokenizer.chat_template"]
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )


def test_tokenizer_cache(tmp_path: "os.PathLike[str]", monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.integrations.gguf as transformers_gguf

    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    cache = gl.tokenizer_cache_dir(DEFAULT)
    assert cache.startswith(os.path.join(str(tmp_path), "gguf"))
    first = gl.load_gguf_tokenizer(DEFAULT)
    assert os.path.isfile(os.path.join(cache, "tokenizer.json"))

    with monkeypatch.context() as patch:
        patch.setattr(transformers_gguf, "get_gguf_tokenizer", lambda *a, **k: pytest.fail("GGUF re-read"))
        start = time.perf_counter()
        second = gl.load_gguf_tokenizer(DEFAULT)
        assert time.perf_counter() - start < 10.0  # ~0.3 s idle; loose for shared CI machines
    assert os.path.samefile(second.name_or_path, cache)
    for text in _TEXTS:
        assert second(text)["input_ids"] == first(text)["input_ids"]
    assert second.chat_template == first.chat_template
    assert (second.bos_token, second.eos_token) == (first.bos_token, first.eos_token)
    assert second.pad_token == first.pad_token == "<|im_end|>"

    # a corrupt cache is rebuilt rather than fatal
    with open(os.path.join(cache, "tokenizer.json"), "w") as f:
        f.write('{"not": "a tokenizer"}')
    third = gl.load_gguf_tokenizer(DEFAULT)
    assert third("Hello world!")["input_ids"] == first("Hello world!")["input_ids"]


def test_tokenizer_cache_key_changes_with_file(tmp_path: "os.PathLike[str]") -> None:
    copy = os.path.join(tmp_path, "model.gguf")
    with open(copy, "wb") as f:
        f.write(b"GGUF" + bytes(60))
    key = gl.tokenizer_cache_dir(copy)
    os.utime(copy, ns=(0, 123_000_000_000))
    assert gl.tokenizer_cache_dir(copy) != key
    assert gl.tokenizer_cache_dir(copy) != gl.tokenizer_cache_dir(DEFAULT)


# ------------------------------------------------------------------------------------------ synthetic files


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, which the loader must undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_tiny_model(
    path: str, arch: str, tied: bool, q8_attention: bool, extra_kv: dict | None = None
) -> dict[str, np.ndarray]:
    """A 2-layer model with random weights; returns the HF-named weights it should load back as."""
    hidden, inter, heads, kv_heads, head_dim, vocab, layers = 64, 96, 4, 2, 32, 80, 2
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, arch)
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_bos_token_id(5)
    w.add_eos_token_id(6)
    for key, value in (extra_kv or {}).items():
        add_value = {str: w.add_string, float: w.add_float32, int: w.add_uint32}[type(value)]
        add_value(key, value)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], permute_heads: int = 0) -> None:
        value = rng.standard_normal(shape).astype(np.float32)
        if gguf_name.endswith(("attn_q.weight", "attn_k.weight")) and q8_attention:
            stored = ref_quantize(value, T.Q8_0)
            value = ref_dequantize(stored, T.Q8_0).reshape(shape)
            if permute_heads:
                stored = _llama_cpp_permute(stored, permute_heads)
            w.add_tensor(gguf_name, stored, raw_dtype=T.Q8_0)
        else:
            w.add_tensor(gguf_name, _llama_cpp_permute(value, permute_heads) if permute_heads else value)
        expected[hf_name] = value

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden))
    for i in range(layers):
        blk, hf = f"blk.{i}", f"model.layers.{i}"
        add(f"{blk}.attn_norm.weight", f"{hf}.input_layernorm.weight", (hidden,))
        add(f"{blk}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", (heads * head_dim, hidden),
            heads if arch == "llama" else 0)  # fmt: skip
        add(f"{blk}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden),
            kv_heads if arch == "llama" else 0)  # fmt: skip
        add(f"{blk}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden))
        add(f"{blk}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", (hidden, heads * head_dim))
        if arch == "qwen2":
            add(f"{blk}.attn_q.bias", f"{hf}.self_attn.q_proj.bias", (heads * head_dim,))
            add(f"{blk}.attn_k.bias", f"{hf}.self_attn.k_proj.bias", (kv_heads * head_dim,))
            add(f"{blk}.attn_v.bias", f"{hf}.self_attn.v_proj.bias", (kv_heads * head_dim,))
        if arch == "qwen3":
            add(f"{blk}.attn_q_norm.weight", f"{hf}.self_attn.q_norm.weight", (head_dim,))
            add(f"{blk}.attn_k_norm.weight", f"{hf}.self_attn.k_norm.weight", (head_dim,))
        add(f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", (hidden,))
        add(f"{blk}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", (inter, hidden))
        add(f"{blk}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", (inter, hidden))
        add(f"{blk}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", (hidden, inter))
    add("output_norm.weight", "model.norm.weight", (hidden,))
    if not tied:
        add("output.weight", "lm_head.weight", (vocab, hidden))

    _finish(w)
    return expected


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
    expected = _write_tiny_model(path, arch, tied=tied, q8_attention=q8_attention)

    cfg = gl.load_gguf_config(path)
    assert type(cfg).__name__ == config_class
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 4, 2, 32)
    assert cfg.tie_word_embeddings is tied
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (5, 6, None)

    params = dict(AutoModelForCausalLM.from_config(cfg).named_parameters())
    ours = dict(gl.iter_gguf_tensors(path, torch.float32))
    assert set(ours) == set(params)
    for name, tensor in ours.items():
        assert tensor.shape == params[name].shape, name
        assert torch.equal(tensor, torch.from_numpy(expected[name])), name


def test_header_reads_metadata_arrays(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(tmp_path, "arrays.gguf")
    w = GGUFWriter(path, "llama")
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, 1.5])
    w.add_array("test.strings", ["a", "bé", ""])
    w.add_string("test.string", "hello")
    w.add_bool("test.bool", True)
    w.add_custom_alignment(64)
    w.add_tensor("token_embd.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
    _finish(w)

    skipped = gl.read_gguf_header(path).metadata
    assert skipped["test.strings"] == gl.UnreadStrings(3)
    md = gl.read_gguf_header(path, keep_strings=True).metadata
    assert md["test.ints"].tolist() == [1, -2, 3]
    assert md["test.floats"].tolist() == [0.5, 1.5]
    assert md["test.strings"] == ["a", "bé", ""]
    assert (md["test.string"], md["test.bool"], md["general.alignment"]) == ("hello", True, 64)
    (info,) = gl.read_gguf_header(path).tensors
    assert info.shape == (2, 4) and info.offset % 64 == 0


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_architecture(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(tmp_path, "mamba.gguf")
    w = GGUFWriter(path, "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    _finish(w)
    with pytest.raises(ValueError, match="'mamba'.*llama, qwen2, qwen3"):
        gl.load_gguf_config(path)
    with pytest.raises(ValueError, match="mamba"):
        next(gl.iter_gguf_tensors(path, torch.float32))


def test_unsupported_tensor_type(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(tmp_path, "q2k.gguf")
    w = GGUFWriter(path, "llama")
    w.add_head_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 84), dtype=np.uint8), raw_dtype=T.Q2_K)
    _finish(w)
    with pytest.raises(ValueError, match="Q2_K"):
        next(gl.iter_gguf_tensors(path, torch.float32))


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
            gl.load_gguf_config(path)
        with pytest.raises(ValueError):
            next(gl.iter_gguf_tensors(path, torch.float32))
    for path in (not_gguf, missing, truncated_header):
        with pytest.raises(ValueError):
            gl.load_gguf_tokenizer(path)


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
