"""The Llama family: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm), Phi-3 (checkpoint
already fused, LongRoPE, partial rotary). Layers may have a sliding window (Mistral, Phi-3, Qwen `layer_types`).

MoE models reuse it and choose each layer's feed-forward block by overriding `make_mlp`.

q/k/v projections are fused into one `qkv_proj` and gate/up into `gate_up_proj` (one matmul each);
`stacked_params` tells the loader where each checkpoint tensor goes. Under tensor parallelism each rank holds its
heads and its slice of the MLP (layers/parallel.py); the attention and MLP outputs are summed across ranks.
"""

from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.distributed.parallel_state import all_reduce, divide, gather_vocab
from pagedserve.model_executor.attention.torch_paged import AttentionMetadata
from pagedserve.model_executor.layers import cpu_ops
from pagedserve.model_executor.layers.attention import Attention, sliding_windows
from pagedserve.model_executor.layers.layernorm import RMSNorm
from pagedserve.model_executor.layers.linear import GateUpLinear
from pagedserve.model_executor.layers.parallel import (
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    kv_heads_held,
)
from pagedserve.model_executor.layers.rotary import RotaryEmbedding, apply_rotary, rope_parameters

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin for this step's positions
MakeMLP = Callable[[PretrainedConfig, int], nn.Module]  # (config, layer index) -> that layer's MLP


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, sliding_window: int | None) -> None:
        super().__init__()
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        self.num_heads = divide(num_heads, "num_attention_heads")  # this rank's heads
        self.num_kv_heads = kv_heads_held(num_kv_heads)[1]  # one, shared with other ranks, if fewer than ranks
        model_type = config.model_type
        attention_bias = getattr(config, "attention_bias", False)
        qkv_bias = model_type == "qwen2" or getattr(config, "qkv_bias", False) or attention_bias
        o_bias = model_type != "qwen2" and attention_bias
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, num_heads, num_kv_heads, qkv_bias)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden, bias=o_bias)
        self.qk_norm = model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, sliding_window)

    def forward(self, rope: Rope, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if not self.qk_norm and cpu_ops.supports(qkv):  # q and k rotated in place, one pass
            cos, sin = (t.view(num_tokens, -1) for t in rope)
            cpu_ops.rope_(qkv, cos, sin, 0, self.num_heads, self.head_dim)
            cpu_ops.rope_(qkv, cos, sin, self.q_size, self.num_kv_heads, self.head_dim)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            return all_reduce(self.o_proj(self.attn(q, k, v, meta)))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (t.to(x.dtype) for t in rope)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return all_reduce(self.o_proj(self.attn(q.flatten(1), k.flatten(1), v, meta)))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (supported: silu)")
        bias = getattr(config, "mlp_bias", False)
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_up_proj = GateUpLinear(config.hidden_size, intermediate_size, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.down_proj(self.gate_up_proj.silu_and_mul(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, mlp: nn.Module, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, sliding_window)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, rope: Rope, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (this layer's output, the residual stream before it): each residual add is fused
        into the next RMSNorm (vLLM's form)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_model_len: int, make_mlp: MakeMLP) -> None:
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        params = rope_parameters(config)
        if params.get("partial_rotary_factor", 1.0) != 1.0 and config.model_type != "phi3":
            raise ValueError("partial_rotary_factor != 1 is not supported")
        self.rotary = RotaryEmbedding(head_dim, max_model_len, params)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, make_mlp(config, i), window)
            for i, window in enumerate(sliding_windows(config, max_model_len))
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary(meta)
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our parameter fragment, shard index)
    stacked_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig, max_model_len: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_model_len, self.make_mlp)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        self.tie_weights()

    @staticmethod
    def make_mlp(config: PretrainedConfig, layer_idx: int) -> nn.Module:
        """The feed-forward block of layer `layer_idx` (MoE models override this)."""
        return LlamaMLP(config)

    def tie_weights(self) -> None:
        """Share the embedding with the head (again after `to_empty`, which unties shared parameters)."""
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def attention_layers(self) -> list[Attention]:
        return [cast(LlamaDecoderLayer, layer).self_attn.attn for layer in self.model.layers]

    def kv_variant(self, prompt_len: int) -> tuple:
        """What besides the tokens decides a request's K/V (a prefix-cache key): LongRoPE's factor choice."""
        return self.model.rotary.kv_variant(prompt_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gather_vocab(self.lm_head(hidden_states), self.config.vocab_size).float()
