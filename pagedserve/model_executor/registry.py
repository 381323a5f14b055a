"""Hugging Face `architectures` name -> model class, and what every model class offers the loader and the runner.

A new architecture is one model file and one line in MODELS (a family that differs from Llama only in settings
is one row in models/variants.py and one line here)."""

from collections.abc import Iterator
from typing import ClassVar, Protocol

import torch
from transformers import PretrainedConfig

from pagedserve.model_executor.attention.torch_paged import AttentionMetadata
from pagedserve.model_executor.layers.attention import Attention
from pagedserve.model_executor.layers.quantization.base import WeightItem
from pagedserve.model_executor.layers.quantization.config import QuantizationConfig
from pagedserve.model_executor.models.gpt2 import GPT2LMHeadModel
from pagedserve.model_executor.models.llama import LlamaForCausalLM
from pagedserve.model_executor.models.mixtral import MixtralForCausalLM
from pagedserve.model_executor.models.qwen_moe import QwenMoeForCausalLM


class CausalLM(Protocol):
    """A model as the loader and the runner use it (an nn.Module, built on the meta device from the HF config,
    max_model_len and the checkpoint's quantization config)."""

    # How checkpoint tensor names map onto the model's parameters (loader.checkpoint_target):
    checkpoint_renames: ClassVar[dict[str, str]]  # name fragment -> fragment, applied first
    # a per-expert projection `...experts.{e}.{proj}.weight` -> (its fused 3-D parameter, shard)
    expert_params: ClassVar[dict[str, tuple[str, int | None]]]
    stacked_params: ClassVar[dict[str, tuple[str, int]]]  # projection fragment -> (fused parameter, shard)

    config: PretrainedConfig

    def __init__(self, config: PretrainedConfig, max_model_len: int,
                 quant_config: QuantizationConfig | None = None) -> None: ...

    @staticmethod
    def map_checkpoint(weights: Iterator[tuple[str, WeightItem]]) -> Iterator[tuple[str, WeightItem]]:
        """The checkpoint's tensors in the model's layout, where it differs beyond names (GPT-2's Conv1D)."""

    def tie_weights(self) -> None:
        """Share the embedding with the head if the config says so (again after `to_empty`)."""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The hidden states of the step's flat batch of tokens."""

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """float32 logits of the rows that sample."""

    def attention_layers(self) -> list[Attention]:
        """One per layer: each holds its KV cache and its window, scale and soft-cap."""

    def kv_variant(self, prompt_len: int) -> tuple:
        """What besides the tokens decides a request's K/V (a prefix-cache key), e.g. LongRoPE's factors."""


MODELS: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,
    "Gemma2ForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": QwenMoeForCausalLM,
    "Qwen3MoeForCausalLM": QwenMoeForCausalLM,
}


def model_class(config: PretrainedConfig) -> type[CausalLM]:
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(
        f"unsupported model architecture {architectures or '(none in config)'}; "
        f"supported: {', '.join(sorted(MODELS))}"
    )
