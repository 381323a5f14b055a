"""The one interface of a quantized linear layer: it takes an `nn.Linear`'s place (keeping its bias parameter),
holds its weight in some integer format, and computes `rows [M, K] -> [M, N]` with its format's kernels
(`matmul`). GGUF blocks (`gguf.GGUFLinear`), int8 and int4 (`int_linear`) implement it."""

import torch
import torch.nn.functional as F
from torch import nn


class QuantizedLinear(nn.Module):
    """What every quantized linear shares: the [.., K] -> [.., N] reshape, the bias, SwiGLU for fused gate/up."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = bias

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, K] @ W^T -> [M, N] in rows' dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """As GateUpLinear's, for a fused gate/up projection."""
        gate, up = self(x).split(self.out_features // 2, dim=-1)
        return F.silu(gate) * up
