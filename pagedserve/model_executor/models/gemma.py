"""Gemma 2 and Gemma 3 (text only).

Both: embeddings scaled by sqrt(hidden_size), (1 + weight) RMSNorms before and after both the attention
and the MLP, a GELU-tanh gated MLP, scores scaled by `query_pre_attn_scalar ** -0.5`, and sliding-window
layers alternating with global ones (`layer_types`). Gemma 2 soft-caps attention scores and final logits
with tanh. Gemma 3 adds q/k RMSNorms and gives each layer type its own rope (`rope_parameters` nested by
type: the sliding layers' base is the old `rope_local_base_freq`); transformers' Gemma 3 ignores
`attn_logit_softcapping`, and so does this.
"""

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from pagedserve.distributed.parallel_state import all_reduce, divide, gather_vocab
from pagedserve.model_executor.attention.torch_paged import AttentionMetadata
from pagedserve.model_executor.layers.attention import Attention, sliding_windows
from pagedserve.model_executor.layers.layernorm import GemmaRMSNorm
from pagedserve.model_executor.layers.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    kv_heads_held,
)
from pagedserve.model_executor.layers.rotary import RotaryEmbedding, rope_parameters
from pagedserve.model_executor.models.llama import LlamaAttention, LlamaForCausalLM, Rope


class GemmaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads = divide(config.num_attention_heads, "num_attention_heads")  # this rank's heads
        self.num_kv_heads = kv_heads_held(config.num_key_value_heads)[1]
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self.qk_norm = config.model_type == "gemma3_text"
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        soft_cap = None if self.qk_norm else config.attn_logit_softcapping
        scale = config.query_pre_attn_scalar**-0.5
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale, sliding_window, soft_cap)

    forward = LlamaAttention.forward  # same projections, q/k norm and rope; only the layer set-up differs


class GemmaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [size, size], bias=False)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return all_reduce(self.down_proj(F.gelu(gate, approximate="tanh") * up))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(config, sliding_window)
        self.mlp = GemmaMLP(config)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, rope: Rope, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(rope, self.input_layernorm(x), meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_model_len: int) -> None:
        super().__init__()
        self.embed_scale = config.hidden_size**0.5
        self.layer_types = list(config.layer_types)
        # one rope per layer type: Gemma 3 nests its rope_parameters by type, Gemma 2 shares one
        self.rotary = nn.ModuleDict({
            layer_type: RotaryEmbedding(config.head_dim, max_model_len, rope_parameters(config, layer_type))
            for layer_type in sorted(set(self.layer_types))
        })
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, window) for window in sliding_windows(config, max_model_len)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)  # the scale rounded to the model's dtype, as transformers
        ropes = {layer_type: rotary(meta) for layer_type, rotary in self.rotary.items()}
        for layer, layer_type in zip(self.layers, self.layer_types):
            x = layer(ropes[layer_type], x, meta)
        return self.norm(x)


class GemmaForCausalLM(nn.Module):
    stacked_params = LlamaForCausalLM.stacked_params

    def __init__(self, config: PretrainedConfig, max_model_len: int) -> None:
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional attention (use_bidirectional_attention) is not supported")
        if config.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(
                f"hidden_activation {config.hidden_activation!r} is not supported (supported: gelu_pytorch_tanh)"
            )
        self.config = config
        self.final_logit_softcapping = config.final_logit_softcapping
        self.model = GemmaModel(config, max_model_len)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the head (again after `to_empty`, which unties shared parameters)."""
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def attention_layers(self) -> list[Attention]:
        return [cast(GemmaDecoderLayer, layer).self_attn.attn for layer in self.model.layers]

    def kv_variant(self, prompt_len: int) -> tuple:
        return sum((cast(RotaryEmbedding, rotary).kv_variant(prompt_len) for rotary in self.model.rotary.values()), ())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = gather_vocab(self.lm_head(hidden_states), self.config.vocab_size)
        if self.final_logit_softcapping is not None:  # in the model's dtype, as transformers
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
