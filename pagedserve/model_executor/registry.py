"""Hugging Face `architectures` name -> model class."""

from torch import nn
from transformers import PretrainedConfig

from pagedserve.model_executor.models.gemma import GemmaForCausalLM
from pagedserve.model_executor.models.gpt2 import GPT2LMHeadModel
from pagedserve.model_executor.models.llama import LlamaForCausalLM
from pagedserve.model_executor.models.mixtral import MixtralForCausalLM
from pagedserve.model_executor.models.qwen_moe import QwenMoeForCausalLM

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
