"""The attention layer a model calls; it owns its slice of the paged KV cache."""

import torch
from torch import nn

from pagedserve.model_executor.attention.torch_paged import AttentionMetadata, paged_attention


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
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
        )
        return out.view(num_tokens, self.num_heads * self.head_dim)
