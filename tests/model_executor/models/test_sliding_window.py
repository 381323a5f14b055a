"""Which layers slide, and the load-time errors for attention features pagedserve does not have."""

import os

import pytest
from conftest import make_checkpoint
from transformers import Gemma2Config, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from pagedserve import LLM
from pagedserve.model_executor.layers.attention import sliding_windows


def test_per_layer_windows_follow_transformers():
    assert sliding_windows(LlamaConfig(num_hidden_layers=2), 512) == [None, None]
    # Mistral and Phi-3: one window for every layer; a window as long as max_model_len never binds
    assert sliding_windows(MistralConfig(num_hidden_layers=2, sliding_window=32), 512) == [32, 32]
    assert sliding_windows(MistralConfig(num_hidden_layers=2, sliding_window=32), 32) == [None, None]
    assert sliding_windows(MistralConfig(num_hidden_layers=2, sliding_window=None), 512) == [None, None]
    # layer_types: Gemma alternates, Qwen2 slides from max_window_layers on, and only if use_sliding_window
    assert sliding_windows(Gemma2Config(num_hidden_layers=4, sliding_window=16), 512) == [16, None, 16, None]
    qwen2 = Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert sliding_windows(qwen2, 512) == [None, 16, 16]
    assert sliding_windows(Qwen2Config(num_hidden_layers=3, sliding_window=16), 512) == [None, None, None]


def test_unknown_layer_type_is_a_value_error():
    config = PretrainedConfig(num_hidden_layers=2, sliding_window=8, layer_types=["chunked_attention"] * 2)
    with pytest.raises(ValueError, match="chunked_attention"):
        sliding_windows(config, 512)


@pytest.mark.parametrize(
    ("arch", "feature", "message"),
    [
        ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        ("gemma2", dict(hidden_activation="gelu"), "hidden_activation"),
        ("gpt2", dict(activation_function="swish"), "activation_function"),
        ("gpt2", dict(add_cross_attention=True), "add_cross_attention"),
    ],
)
def test_unsupported_feature_fails_at_load(tmp_path, monkeypatch, arch, feature, message):
    import conftest

    config_cls, model_cls, extra = conftest.ARCHITECTURES[arch]
    monkeypatch.setitem(conftest.ARCHITECTURES, arch, (config_cls, model_cls, {**extra, **feature}))
    path = make_checkpoint(os.path.join(tmp_path, arch), arch)
    with pytest.raises(ValueError, match=message):
        LLM(path, dtype="float32", num_kv_blocks=16)
