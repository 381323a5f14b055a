"""Hugging Face `architectures` name -> model class, and what every model class offers the runner."""

from typing import Protocol

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.model_executor.attention.torch_paged import AttentionMetadata
from pagedserve.model_executor.layers.attention import Attention
from pagedserve.model_executor.models.gemma import GemmaForCausalLM
from pagedserve.model_executor.models.gpt2 import GPT2LMHeadModel
from pagedserve.model_executor.models.llama import LlamaForCausalLM
from pagedserve.model_executor.models.mixtral import MixtralForCausalLM
from pagedserve.model_executor.models.qwen_moe import QwenMoeForCausalLM


class CausalLM(Protocol):
    """A model as the runner uses it (an nn.Module built from the HF config and max_model_len)."""

    config: PretrainedConfig

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The hidden states of the step's flat batch of tokens."""

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """float32 logits of the rows that sample."""

    def attention_layers(self) -> list[Attention]:
        """One per layer: each holds its KV cache and its window, scale and soft-cap."""

    def kv_variant(self, prompt_len: int) -> tuple:
        """What besides the tokens decides a request's K/V (a prefix-cache key), e.g. LongRoPE's factors."""

    def tie_weights(self) -> None:
        """Share the embedding with the head if the config says so (again after `to_empty`)."""


MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": QwenMoeForCausalLM,
    "Qwen3MoeForCausalLM": QwenMoeForCausalLM,
}


def model_class(config: PretrainedConfig) -> type[nn.Module]:
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(
        f"unsupported model architecture {architectures or '(none in config)'}; "
        f"supported: {', '.join(sorted(MODELS))}"
    )
