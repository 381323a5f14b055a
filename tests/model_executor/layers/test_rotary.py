"""Rotary tables and their application against transformers' own rotary modules."""

import pytest
import torch
from transformers import Gemma3TextConfig, Phi3Config
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary

from pagedserve.model_executor.attention.torch_paged import AttentionMetadata
from pagedserve.model_executor.layers.rotary import RotaryEmbedding, apply_rotary, rope_parameters

HEAD_DIM = 16


def prefill_metadata(prompt_len: int) -> AttentionMetadata:
    return AttentionMetadata.build([prompt_len], [prompt_len], [prompt_len], [list(range(prompt_len))], 1, "cpu")


def phi3_config(**rope) -> Phi3Config:
    return Phi3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        original_max_position_embeddings=80, rope_scaling=rope, partial_rotary_factor=0.75,
    )


@pytest.mark.parametrize("prompt_len", [80, 81, 300])
def test_longrope_picks_factors_by_prompt_length_as_transformers(prompt_len):
    config = phi3_config(
        rope_type="longrope", short_factor=[1.0, 1.2, 1.5, 2.0, 3.0, 4.0], long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    )
    theirs = Phi3RotaryEmbedding(config)
    positions = torch.arange(prompt_len)
    cos_ref, sin_ref = theirs(torch.zeros(1, dtype=torch.float32), positions[None])
    ours = RotaryEmbedding(HEAD_DIM, 512, rope_parameters(config))
    cos, sin = ours(prefill_metadata(prompt_len))
    assert cos.shape == (prompt_len, 1, 12)  # partial rotary: 3/4 of the head
    torch.testing.assert_close(cos[:, 0], cos_ref[0], atol=0, rtol=0)
    torch.testing.assert_close(sin[:, 0], sin_ref[0], atol=0, rtol=0)


def test_partial_rotary_leaves_the_rest_of_the_head():
    config = phi3_config(rope_type="default")
    cos, sin = RotaryEmbedding(HEAD_DIM, 64, rope_parameters(config))(prefill_metadata(20))
    q, k = torch.randn(2, 20, 4, HEAD_DIM)
    q_ref, k_ref = phi3_apply_rotary(q.transpose(0, 1), k.transpose(0, 1), cos[:, 0], sin[:, 0], unsqueeze_dim=0)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_ref.transpose(0, 1))
    torch.testing.assert_close(apply_rotary(k, cos, sin)[..., 12:], k[..., 12:], atol=0, rtol=0)


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_gemma3_rope_per_layer_type(layer_type):
    config = Gemma3TextConfig(
        hidden_size=64, head_dim=HEAD_DIM, num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
    )
    cos_ref, sin_ref = Gemma3RotaryEmbedding(config)(torch.zeros(1), torch.arange(100)[None], layer_type)
    cos, sin = RotaryEmbedding(HEAD_DIM, 128, rope_parameters(config, layer_type))(prefill_metadata(100))
    torch.testing.assert_close(cos[:, 0], cos_ref[0], atol=0, rtol=0)
    torch.testing.assert_close(sin[:, 0], sin_ref[0], atol=0, rtol=0)
