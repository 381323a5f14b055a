"""The Llama decoder and the families built on it: Llama, Mistral, Qwen2, Qwen3, Phi-3 (checkpoint already fused,
LongRoPE, partial rotary), Gemma 2 and Gemma 3. How each family differs is data (`variants.DecoderArgs`), read
by these classes. Layers may have a sliding window (Mistral, Phi-3, Qwen and Gemma `layer_types`).

MoE models reuse it and choose each layer's feed-forward block by overriding `make_mlp`.

q/k/v projections are fused into one `qkv_proj` and gate/up into `gate_up_proj` (one matmul each);
`stacked_params` tells the loader where each checkpoint tensor goes. Under tensor parallelism each rank holds its
heads and its slice of the MLP, and the output projections sum the ranks' partials (layers/parallel.py).
"""

from collections.abc import Callable, Iterator
from typing import ClassVar, cast

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.distributed.parallel_state import divide, gather_vocab
from pagedserve.model_executor.attention.torch_paged import AttentionMetadata
from pagedserve.model_executor.layers import cpu_ops
from pagedserve.model_executor.layers.attention import Attention, sliding_windows
from pagedserve.model_executor.layers.layernorm import RMSNorm
from pagedserve.model_executor.layers.parallel import (
    GateUpLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    kv_heads_held,
)
from pagedserve.model_executor.layers.quantization.base import WeightItem
from pagedserve.model_executor.layers.quantization.config import QuantizationConfig
from pagedserve.model_executor.layers.rotary import RotaryEmbedding, apply_rotary, rope_parameters
from pagedserve.model_executor.models.variants import DecoderArgs

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin for this step's positions
# (config, args, layer index, quantization, module name) -> that layer's MLP
MakeMLP = Callable[[PretrainedConfig, DecoderArgs, int, QuantizationConfig | None, str], nn.Module]


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, args: DecoderArgs, sliding_window: int | None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        self.head_dim = args.head_dim
        self.num_heads = divide(num_heads, "num_attention_heads")  # this rank's heads
        self.num_kv_heads = kv_heads_held(args.num_kv_heads)[1]  # one, shared with other ranks, if fewer than ranks
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, num_heads, args.num_kv_heads, args.qkv_bias,
                                          quant_config, f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden, args.o_bias, quant_config,
                                        f"{prefix}.o_proj")
        self.qk_norm = args.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, args.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, args.norm_offset)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, args.attn_scale, sliding_window,
                              args.attn_soft_cap)

    def forward(self, rope: Rope, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if not self.qk_norm and cpu_ops.supports(qkv):  # q and k rotated in place, one pass
            cos, sin = (t.view(num_tokens, -1) for t in rope)
            cpu_ops.rope_(qkv, cos, sin, 0, self.num_heads, self.head_dim)
            cpu_ops.rope_(qkv, cos, sin, self.q_size, self.num_kv_heads, self.head_dim)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            return self.o_proj(self.attn(q, k, v, meta))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (t.to(x.dtype) for t in rope)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q.flatten(1), k.flatten(1), v, meta))


class LlamaMLP(nn.Module):
    """The gated MLP: act(gate) * up, then down; the activation is the family's (SwiGLU, Gemma's GeGLU)."""

    def __init__(self, config: PretrainedConfig, intermediate_size: int | None = None, args: DecoderArgs | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        key, supported = (args or DecoderArgs.from_config(config)).activation
        if getattr(config, key, supported) != supported:
            raise ValueError(f"{key} {getattr(config, key)!r} is not supported (supported: {supported})")
        bias = getattr(config, "mlp_bias", False)
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_up_proj = GateUpLinear(config.hidden_size, intermediate_size, bias, supported, quant_config,
                                         f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, config.hidden_size, bias, quant_config,
                                           f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.act_and_mul(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, args: DecoderArgs, mlp: nn.Module, sliding_window: int | None,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, args, sliding_window, quant_config, f"{prefix}.self_attn")
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, args.norm_offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, args.norm_offset)

    def forward(
        self, rope: Rope, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, residual) -> (this layer's output, the residual stream before it): each residual add is fused
        into the next RMSNorm (vLLM's form)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class SandwichDecoderLayer(LlamaDecoderLayer):
    """Norms before and after both the attention and the MLP (Gemma): each block's normalised output is added to
    the residual stream, which is the layer's output (no residual is carried: the second value is None)."""

    def __init__(self, config: PretrainedConfig, args: DecoderArgs, mlp: nn.Module, sliding_window: int | None,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__(config, args, mlp, sliding_window, quant_config, prefix)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, args.norm_offset)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, args.norm_offset)

    def forward(
        self, rope: Rope, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.post_attention_layernorm(self.self_attn(rope, self.input_layernorm(x), meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), None


def _ropes(config: PretrainedConfig, args: DecoderArgs, max_model_len: int,
           num_layers: int) -> tuple[dict[str, RotaryEmbedding], list[str]]:
    """The ropes by name, and which one each layer uses: one for all layers, or one per layer type."""
    if args.rope_per_layer_type:
        layer_types = list(config.layer_types)
        return {layer_type: RotaryEmbedding(args.head_dim, max_model_len, rope_parameters(config, layer_type))
                for layer_type in sorted(set(layer_types))}, layer_types
    params = rope_parameters(config)
    if params.get("partial_rotary_factor", 1.0) != 1.0 and not args.partial_rotary:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    return {"all": RotaryEmbedding(args.head_dim, max_model_len, params)}, ["all"] * num_layers


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, args: DecoderArgs, max_model_len: int, make_mlp: MakeMLP,
                 quant_config: QuantizationConfig | None = None, prefix: str = "model") -> None:
        super().__init__()
        windows = sliding_windows(config, max_model_len)
        ropes, self.layer_ropes = _ropes(config, args, max_model_len, len(windows))
        self.rotary = nn.ModuleDict(ropes)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config,
                                                   f"{prefix}.embed_tokens")
        self.embed_scale = args.embed_scale
        layer_class = SandwichDecoderLayer if args.sandwich_norms else LlamaDecoderLayer
        self.layers = nn.ModuleList(
            layer_class(config, args, make_mlp(config, args, i, quant_config, f"{prefix}.layers.{i}.mlp"), window,
                        quant_config, f"{prefix}.layers.{i}")
            for i, window in enumerate(windows)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, args.norm_offset)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:  # the scale rounded to the model's dtype, as transformers
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        ropes = {name: rotary(meta) for name, rotary in self.rotary.items()}
        residual = None
        for layer, rope in zip(self.layers, self.layer_ropes):
            x, residual = layer(ropes[rope], x, residual, meta)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our parameter fragment, shard index)
    stacked_params: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    expert_params: ClassVar[dict[str, tuple[str, int | None]]] = {}  # MoE models': see registry.CausalLM
    checkpoint_renames: ClassVar[dict[str, str]] = {}

    def __init__(self, config: PretrainedConfig, max_model_len: int,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = config
        args = DecoderArgs.from_config(config)
        self.final_soft_cap = args.final_soft_cap
        self.model = LlamaModel(config, args, max_model_len, self.make_mlp, quant_config)
        tied = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, quant_config, "lm_head", tied)
        self.tie_weights()

    @staticmethod
    def make_mlp(config: PretrainedConfig, args: DecoderArgs, layer_idx: int,
                 quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
        """The feed-forward block of layer `layer_idx` (MoE models override this)."""
        return LlamaMLP(config, None, args, quant_config, prefix)

    @staticmethod
    def map_checkpoint(weights: Iterator[tuple[str, WeightItem]]) -> Iterator[tuple[str, WeightItem]]:
        return weights  # the checkpoint's layout is ours but for names

    def tie_weights(self) -> None:
        """Share the embedding with the head (again after `to_empty`, which unties shared tensors)."""
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.model.embed_tokens)

    def attention_layers(self) -> list[Attention]:
        return [cast(LlamaDecoderLayer, layer).self_attn.attn for layer in self.model.layers]

    def kv_variant(self, prompt_len: int) -> tuple:
        """What besides the tokens decides a request's K/V (a prefix-cache key): LongRoPE's factor choice."""
        return sum((cast(RotaryEmbedding, rotary).kv_variant(prompt_len) for rotary in self.model.rotary.values()), ())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = gather_vocab(self.lm_head(hidden_states), self.config.vocab_size)
        if self.final_soft_cap is not None:  # in the model's dtype, as transformers
            logits = torch.tanh(logits / self.final_soft_cap) * self.final_soft_cap
        return logits.float()
