"""How each family built on Llama's decoder differs from it: one row of data per Hugging Face `model_type`
(`FAMILIES`), filled with the config's values into the `DecoderArgs` the model classes read. A family that differs
only in these settings needs a row here and a line in the registry, no code.

- Llama, Mistral, Mixtral, Qwen2-MoE: the default row (q/k/v and o biases as the config says).
- Qwen2: q/k/v always biased, o never. Qwen3 (and its MoE): per-head q/k RMSNorm. Phi-3: partial rotary.
- Gemma 2 / 3: embeddings scaled by sqrt(hidden_size), (1 + weight) RMSNorms before and after both the attention
  and the MLP, a GELU-tanh gated MLP, scores scaled by `query_pre_attn_scalar ** -0.5`, and each layer type with its
  own rope (Gemma 3 nests `rope_parameters` by type: the sliding layers' base is the old `rope_local_base_freq`).
  Gemma 2 soft-caps attention scores and final logits with tanh; Gemma 3 adds q/k RMSNorms and, as transformers'
  Gemma 3, ignores `attn_logit_softcapping`.
"""

from dataclasses import dataclass, replace

from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    """One family's row: its fixed traits, and which config values it reads."""

    qwen2_biases: bool = False  # q/k/v always biased, o never
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rope
    partial_rotary: bool = False  # `partial_rotary_factor` < 1 allowed (only part of each head rotates)
    norm_offset: float = 0.0  # RMSNorms scale by (norm_offset + weight)
    sandwich_norms: bool = False  # norms after the attention and the MLP too, on their outputs
    activation: tuple[str, str] = ("hidden_act", "silu")  # (config key, the one gated-MLP activation supported)
    scaled_embedding: bool = False  # embeddings times sqrt(hidden_size), rounded to the model's dtype
    query_pre_attn_scalar: bool = False  # scores scaled by config.query_pre_attn_scalar ** -0.5, not head_dim's
    attn_soft_cap: bool = False  # read attn_logit_softcapping
    final_soft_cap: bool = False  # read final_logit_softcapping
    rope_per_layer_type: bool = False  # one rope per layer type (`rope_parameters` may be nested by type)
    bidirectional_refused: bool = False  # use_bidirectional_attention is refused


_GEMMA = Family(norm_offset=1.0, sandwich_norms=True, activation=("hidden_activation", "gelu_pytorch_tanh"),
                scaled_embedding=True, query_pre_attn_scalar=True, final_soft_cap=True, rope_per_layer_type=True,
                bidirectional_refused=True)

FAMILIES: dict[str, Family] = {  # model_type -> its row; any other model_type reads as Llama
    "qwen2": Family(qwen2_biases=True),
    "qwen3": Family(qk_norm=True),
    "qwen3_moe": Family(qk_norm=True),
    "phi3": Family(partial_rotary=True),
    "gemma2": replace(_GEMMA, attn_soft_cap=True),
    "gemma3_text": replace(_GEMMA, qk_norm=True),
}


@dataclass(frozen=True)
class DecoderArgs:
    """A decoder's settings, its family's row filled with its config's values."""

    head_dim: int
    num_kv_heads: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    partial_rotary: bool
    norm_offset: float
    sandwich_norms: bool
    activation: tuple[str, str]
    attn_scale: float
    attn_soft_cap: float | None
    final_soft_cap: float | None
    embed_scale: float | None
    rope_per_layer_type: bool

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> "DecoderArgs":
        family = FAMILIES.get(config.model_type, Family())
        if family.bidirectional_refused and getattr(config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional attention (use_bidirectional_attention) is not supported")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attention_bias = getattr(config, "attention_bias", False)
        return cls(
            head_dim=head_dim,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            qkv_bias=family.qwen2_biases or getattr(config, "qkv_bias", False) or attention_bias,
            o_bias=not family.qwen2_biases and attention_bias,
            qk_norm=family.qk_norm,
            partial_rotary=family.partial_rotary,
            norm_offset=family.norm_offset,
            sandwich_norms=family.sandwich_norms,
            activation=family.activation,
            attn_scale=(config.query_pre_attn_scalar if family.query_pre_attn_scalar else head_dim) ** -0.5,
            attn_soft_cap=config.attn_logit_softcapping if family.attn_soft_cap else None,
            final_soft_cap=config.final_logit_softcapping if family.final_soft_cap else None,
            embed_scale=config.hidden_size**0.5 if family.scaled_embedding else None,
            rope_per_layer_type=family.rope_per_layer_type,
        )
