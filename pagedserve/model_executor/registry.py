"""Hugging Face `architectures` name -> model class."""

from torch import nn
from transformers import PretrainedConfig

from pagedserve.model_executor.models.llama import LlamaForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
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
