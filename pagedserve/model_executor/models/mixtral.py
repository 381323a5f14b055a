"""Mixtral: Mistral attention with a sparse MoE feed-forward in every layer (top-k renormalised)."""

from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig

from pagedserve.model_executor.layers.moe import SparseMoeBlock
from pagedserve.model_executor.layers.quantization.config import QuantizationConfig
from pagedserve.model_executor.models.llama import LlamaForCausalLM
from pagedserve.model_executor.models.variants import DecoderArgs


class MixtralForCausalLM(LlamaForCausalLM):
    # Hub checkpoints name the MoE block `block_sparse_moe` and its experts' projections w1 (gate), w3 (up), w2 (down)
    checkpoint_renames: ClassVar[dict[str, str]] = {".block_sparse_moe.": ".mlp."}
    expert_params: ClassVar[dict[str, tuple[str, int | None]]] = {
        "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),
    }

    @staticmethod
    def make_mlp(config: PretrainedConfig, args: DecoderArgs, layer_idx: int,
                 quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
        return SparseMoeBlock(
            config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok,
            renormalize=True, hidden_act=config.hidden_act, quant_config=quant_config, prefix=prefix,
        )
