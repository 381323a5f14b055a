"""GPT-2: learned position embeddings, LayerNorm, a GELU MLP, biases everywhere, tied head.

The checkpoint stores its projections as transformers' `Conv1D` ([in, out]); `map_checkpoint` transposes
them into our linear layers' [out, in] at load, so the matmuls, weight packing and quantization are those of every
model.
"""

from collections.abc import Iterator
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from pagedserve.distributed.parallel_state import divide, gather_vocab
from pagedserve.model_executor.attention.torch_paged import AttentionMetadata
from pagedserve.model_executor.layers.attention import Attention
from pagedserve.model_executor.layers.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pagedserve.model_executor.layers.quantization.base import WeightItem, float_tensor
from pagedserve.model_executor.layers.quantization.config import QuantizationConfig

_ACTIVATIONS = {  # transformers' activation_function -> the op
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
_CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        hidden = config.hidden_size
        head_dim = hidden // config.num_attention_heads
        num_heads = divide(config.num_attention_heads, "num_attention_heads")  # this rank's heads
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.c_attn = ColumnParallelLinear(hidden, [hidden, hidden, hidden], True, quant_config, f"{prefix}.c_attn")
        self.c_proj = RowParallelLinear(hidden, hidden, True, quant_config, f"{prefix}.c_proj")
        self.attn = Attention(num_heads, num_heads, head_dim, scale)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, config: PretrainedConfig, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, [inner], True, quant_config, f"{prefix}.c_fc")
        self.c_proj = RowParallelLinear(inner, config.hidden_size, True, quant_config, f"{prefix}.c_proj")
        self.act = _ACTIVATIONS[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx, quant_config, f"{prefix}.attn")
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: PretrainedConfig, quant_config: QuantizationConfig | None,
                 prefix: str = "transformer") -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config, f"{prefix}.wte")
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i, quant_config, f"{prefix}.h.{i}")
                               for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x, meta)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    stacked_params: ClassVar[dict[str, tuple[str, int]]] = {}  # the checkpoint's q/k/v are fused already
    expert_params: ClassVar[dict[str, tuple[str, int | None]]] = {}
    checkpoint_renames: ClassVar[dict[str, str]] = {}

    def __init__(self, config: PretrainedConfig, max_model_len: int,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention) is not supported")
        if config.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"activation_function {config.activation_function!r} is not supported "
                f"(supported: {', '.join(_ACTIVATIONS)})"
            )
        if max_model_len > config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds GPT-2's {config.max_position_embeddings} learned positions"
            )
        self.config = config
        self.transformer = GPT2Model(config, quant_config)
        tied = self.transformer.wte if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, quant_config, "lm_head", tied)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the head (again after `to_empty`, which unties shared tensors)."""
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.transformer.wte)

    @staticmethod
    def map_checkpoint(weights: Iterator[tuple[str, WeightItem]]) -> Iterator[tuple[str, WeightItem]]:
        """Conv1D weights transposed; old checkpoints' names without `transformer.` and their mask buffers."""
        for name, tensor in weights:
            if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
                continue
            if not name.startswith(("transformer.", "lm_head.")):
                name = f"transformer.{name}"
            yield name, float_tensor(tensor).t() if name.endswith(_CONV1D_WEIGHTS) else tensor

    def attention_layers(self) -> list[Attention]:
        return [cast(GPT2Block, block).attn.attn for block in self.transformer.h]

    def kv_variant(self, prompt_len: int) -> tuple:
        return ()  # learned positions: a token's K/V depend on the tokens alone

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gather_vocab(self.lm_head(hidden_states), self.config.vocab_size).float()
