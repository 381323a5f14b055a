"""GGUF files written for the tests with gguf's own writer."""

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, which the loader must undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_model(
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
                stored = llama_cpp_permute(stored, permute_heads)
            w.add_tensor(gguf_name, stored, raw_dtype=T.Q8_0)
        else:
            w.add_tensor(gguf_name, llama_cpp_permute(value, permute_heads) if permute_heads else value)
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

    finish(w)
    return expected
