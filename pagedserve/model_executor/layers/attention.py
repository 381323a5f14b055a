"""The attention layer a model calls; it owns its slice of the paged KV cache."""

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.model_executor.attention.torch_paged import AttentionMetadata, paged_attention


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window = sliding_window  # a query sees itself and the sliding_window - 1 tokens before it
        self.soft_cap = soft_cap  # scores -> soft_cap * tanh(scores / soft_cap) before the softmax
        self.kv_cache = torch.empty(0)  # [2, Hkv, num_blocks, block_size, D], bound by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H*D], k, v: [T, Hkv*D] -> [T, H*D]."""
        num_tokens = q.shape[0]
        out = paged_attention(
            q.view(num_tokens, self.num_heads, self.head_dim),
            k.view(num_tokens, self.num_kv_heads, self.head_dim),
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
            self.kv_cache,
            meta,
            self.scale,
            self.sliding_window,
            self.soft_cap,
        )
        return out.view(num_tokens, self.num_heads * self.head_dim)


def sliding_windows(config: PretrainedConfig, max_model_len: int) -> list[int | None]:
    """Each layer's sliding window, None for global attention, as transformers reads the config.

    `layer_types` (Gemma, Qwen2/3) says which layers slide; without it (Mistral, Phi-3) `sliding_window`
    applies to every layer. A window no shorter than max_model_len never binds, so it is dropped.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    windows = []
    for layer_type in layer_types:
        if layer_type not in ("sliding_attention", "full_attention"):
            raise ValueError(f"attention layer type {layer_type!r} is not supported (supported: full, sliding)")
        sliding = layer_type == "sliding_attention" and window is not None and 0 < window < max_model_len
        windows.append(window if sliding else None)
    return windows
