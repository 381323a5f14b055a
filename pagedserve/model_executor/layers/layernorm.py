from typing import overload

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.model_executor.layers import cpu_ops


class RMSNorm(nn.Module):
    """RMSNorm, statistics in float32 (as transformers). With `residual` (vLLM's fused form), it first adds x
    to the residual stream and normalises that: `x, residual = norm(x, residual)`, in place, one pass on the
    CPU (layers/cpu_ops.cpp).

    With an `offset` (Gemma's 1) it scales by (offset + weight), all in float32 and rounded once at the end, as
    transformers' Gemma norm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.offset = offset

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        native = not self.offset and cpu_ops.supports(x)
        if residual is None:
            return cpu_ops.rms_norm(x, self.weight, self.eps) if native else self._norm(x)
        if native and x.is_contiguous() and residual.is_contiguous():
            cpu_ops.add_rms_norm_(x, residual, self.weight, self.eps)
            return x, residual
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            return F.rms_norm(x.float(), self.weight.shape, self.offset + self.weight.float(), self.eps).to(x.dtype)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
