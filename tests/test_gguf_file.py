"""Reading GGUF headers and the Hugging Face config of their metadata, against transformers' own GGUF loading."""

import os

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from gguf_utils import finish, write_tiny_model

from pagedserve import gguf_file as gf
from pagedserve.model_files import default_model_path

DEFAULT = default_model_path()


# --------------------------------------------------------------------------------------------- default model


def test_config_of_default_model() -> None:
    cfg = gf.load_gguf_config(DEFAULT)
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
    ours, ref = gf.load_gguf_config(DEFAULT), hf_model.config
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
    write_tiny_model(path, "qwen2", tied=True, q8_attention=False, extra_kv=extra_kv)
    expected = {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    assert gf.load_gguf_config(path).rope_parameters == expected

    path = os.path.join(tmp_path, "incomplete.gguf")
    w = GGUFWriter(path, "llama")
    w.add_embedding_length(64)
    finish(w)
    with pytest.raises(ValueError, match="llama.attention.head_count"):
        gf.load_gguf_config(path)


# ------------------------------------------------------------------------------------------- synthetic files


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
    finish(w)

    skipped = gf.read_gguf_header(path).metadata
    assert skipped["test.strings"] == gf.UnreadStrings(3)
    md = gf.read_gguf_header(path, keep_strings=True).metadata
    assert md["test.ints"].tolist() == [1, -2, 3]
    assert md["test.floats"].tolist() == [0.5, 1.5]
    assert md["test.strings"] == ["a", "bé", ""]
    assert (md["test.string"], md["test.bool"], md["general.alignment"]) == ("hello", True, 64)
    (info,) = gf.read_gguf_header(path).tensors
    assert info.shape == (2, 4) and info.offset % 64 == 0
