"""Qwen2-MoE (Qwen2 attention with q/k/v bias, MoE + a sigmoid-gated shared expert) and Qwen3-MoE
(Qwen3 attention with q/k norm, MoE). Layers listed in `mlp_only_layers`, or off the
`decoder_sparse_step` stride, keep a dense MLP.
"""

from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig

from pagedserve.model_executor.layers.moe import SparseMoeBlock
from pagedserve.model_executor.layers.quantization.config import QuantizationConfig
from pagedserve.model_executor.models.llama import LlamaForCausalLM, LlamaMLP
from pagedserve.model_executor.models.variants import DecoderArgs


def is_sparse_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    return (
        layer_idx not in (config.mlp_only_layers or [])
        and config.num_experts > 0
        and (layer_idx + 1) % config.decoder_sparse_step == 0
    )


class QwenMoeForCausalLM(LlamaForCausalLM):
    expert_params: ClassVar[dict[str, tuple[str, int | None]]] = {
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None),
    }

    @staticmethod
    def make_mlp(config: PretrainedConfig, args: DecoderArgs, layer_idx: int,
                 quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
        if not is_sparse_layer(config, layer_idx):
            return LlamaMLP(config, None, args, quant_config, prefix)
        shared_size = getattr(config, "shared_expert_intermediate_size", 0)
        shared = LlamaMLP(config, shared_size, args, quant_config, f"{prefix}.shared_expert") if shared_size else None
        return SparseMoeBlock(
            config.hidden_size, config.moe_intermediate_size, config.num_experts, config.num_experts_per_tok,
            renormalize=config.norm_topk_prob, hidden_act=config.hidden_act, shared_expert=shared,
            quant_config=quant_config, prefix=prefix,
        )
