"""A linear layer whose weight stays in a GGUF file's block format (`LLM(..., quantization="gguf")`).

The weight is the file's raw blocks, whole rows of them: `blocks` is uint8 [out_features, bytes per row]. A
fused projection (qkv, gate/up) is its parts' rows one after another, which is only a concatenation of their
blocks, so the loader copies each part into its row range as it would a float weight. The matmul itself is in
one file per format family (`gguf_q4_q8.py`: Q4_0, Q4_1, Q8_0).
"""

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.model_executor.gguf_loader import block_format
from pagedserve.model_executor.layers.quantization import gguf_q4_q8

KERNEL_TYPES = frozenset(gguf_q4_q8.FORMATS)  # ggml types with a kernel


class GGUFLinear(nn.Module):
    blocks: torch.Tensor

    def __init__(self, linear: nn.Linear, ggml_type: int) -> None:
        """Takes the place of `linear` (keeping its bias parameter); `blocks` is filled by the loader."""
        super().__init__()
        self.in_features, self.out_features, self.ggml_type = linear.in_features, linear.out_features, ggml_type
        block_size, type_size = block_format(ggml_type)
        if self.in_features % block_size:
            raise ValueError(f"in_features {self.in_features} is not a multiple of the block size {block_size}")
        row_bytes = self.in_features // block_size * type_size
        self.register_buffer("blocks", torch.empty(self.out_features, row_bytes, dtype=torch.uint8,
                                                   device=linear.weight.device))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = gguf_q4_q8.matmul(rows, self.blocks, self.ggml_type, self.out_features)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """As GateUpLinear's, for a fused gate/up projection kept quantized."""
        gate, up = self(x).split(self.out_features // 2, dim=-1)
        return F.silu(gate) * up

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.ggml_type!r}"
