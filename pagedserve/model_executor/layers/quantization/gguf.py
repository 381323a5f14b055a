"""Layers whose weight stays in a GGUF file's block format (`quantization="gguf"`, the default for a .gguf file).

The weight is the file's raw blocks, whole rows of them: `blocks` is uint8 [out_features, bytes per row]. A
fused projection (qkv, gate/up) whose parts share a type is its parts' rows one after another, which is only a
concatenation of their blocks, so the loader copies each part into its row range as it would a float weight; parts
of different types (a Q4_K_M file's Q4_K q/k and Q6_K v) stay separate layers, `GGUFParts`. An embedding keeps its
blocks too (`GGUFEmbedding`, rows dequantized as they are looked up), and a head tied to it reads the same blocks.
The kernels are in one file per format family (`gguf_q4_q8.py`: Q4_0, Q4_1, Q8_0; `gguf_kquants.py`: Q4_K, Q5_K,
Q6_K), each with the same `matmul(x, blocks, ggml_type, n)` and `dequantize(blocks, ggml_type, n, k, dtype)`.
"""

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from pagedserve.model_executor.gguf_loader import block_format
from pagedserve.model_executor.layers.quantization import gguf_kquants, gguf_q4_q8
from pagedserve.model_executor.layers.quantization.base import QuantizedLinear

_FAMILIES = {ggml_type: family for family in (gguf_q4_q8, gguf_kquants) for ggml_type in family.FORMATS}
KERNEL_TYPES = frozenset(_FAMILIES)  # ggml types with a kernel


def _empty_blocks(rows: int, in_features: int, ggml_type: int, device: torch.device) -> torch.Tensor:
    block_size, type_size = block_format(ggml_type)
    if in_features % block_size:
        raise ValueError(f"in_features {in_features} is not a multiple of the block size {block_size}")
    return torch.empty(rows, in_features // block_size * type_size, dtype=torch.uint8, device=device)


class GGUFLinear(QuantizedLinear):
    blocks: torch.Tensor

    def __init__(self, linear: nn.Linear, ggml_type: int) -> None:
        """Takes the place of `linear` (keeping its bias parameter); `blocks` is filled by the loader."""
        super().__init__(linear.in_features, linear.out_features, linear.bias)
        self.ggml_type = ggml_type
        self.register_buffer("blocks", _empty_blocks(self.out_features, self.in_features, ggml_type,
                                                     linear.weight.device))

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return _FAMILIES[self.ggml_type].matmul(rows, self.blocks, self.ggml_type, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.ggml_type!r}"


class GGUFParts(QuantizedLinear):
    """A fused projection whose parts (q, k, v or gate, up) have different ggml types: one GGUFLinear per part,
    outputs concatenated (`parts[i]` is checkpoint shard i); the fused bias stays whole."""

    def __init__(self, linear: nn.Linear, part_types: Sequence[tuple[int, int]]) -> None:
        """`part_types`: (rows, ggml type) of each part, in shard order."""
        super().__init__(linear.in_features, linear.out_features, linear.bias)
        self.parts = nn.ModuleList()
        for rows, ggml_type in part_types:
            layer = GGUFLinear(nn.Linear(self.in_features, rows, bias=False, device="meta"), ggml_type)
            layer.blocks = _empty_blocks(rows, self.in_features, ggml_type, linear.weight.device)
            self.parts.append(layer)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([cast(GGUFLinear, part).matmul(rows) for part in self.parts], dim=-1)


class GGUFEmbedding(nn.Module):
    """An embedding table kept in its blocks: the rows of a step's tokens are dequantized as they are looked up."""

    blocks: torch.Tensor

    def __init__(self, embedding: nn.Embedding, ggml_type: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.ggml_type, self.dtype = ggml_type, embedding.weight.dtype
        self.register_buffer("blocks", _empty_blocks(self.num_embeddings, self.embedding_dim, ggml_type,
                                                     embedding.weight.device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        rows = _FAMILIES[self.ggml_type].dequantize(self.blocks[ids], self.ggml_type, ids.numel(),
                                                    self.embedding_dim, self.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def tied_head(self, head: nn.Linear) -> GGUFLinear:
        """A GGUFLinear in place of `head` (the head tied to this table) that reads the same blocks."""
        layer = GGUFLinear(nn.Linear(head.in_features, head.out_features, bias=False, device="meta"), self.ggml_type)
        layer.blocks = self.blocks
        return layer

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.ggml_type!r}"
