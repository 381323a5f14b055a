"""Weights that stay in a GGUF file's block format (`quantization="gguf"`, the default for a .gguf file).

A layer's weight is the file's raw blocks, whole rows of them: `blocks` is uint8 [out_features, bytes per row]. A
fused projection (qkv, gate/up) whose parts share a type is its parts' rows one after another, which is only a
concatenation of their blocks, so each part is copied into its row range as a float weight would be; parts of
different types (a Q4_K_M file's Q4_K q/k and Q6_K v) keep one block tensor each (`GGUFPartsMethod`). An embedding
keeps its blocks too (rows dequantized as they are looked up), and a head tied to it reads the same blocks. The
kernels are in one file per format family (`gguf_q4_q8.py`: Q4_0, Q4_1, Q8_0; `gguf_kquants.py`: Q4_K, Q5_K,
Q6_K), each with the same `matmul(x, blocks, ggml_type, n)` and `dequantize(blocks, ggml_type, n, k, dtype)`.
"""

import logging
from collections import Counter

import torch
from gguf import GGMLQuantizationType

from pagedserve.gguf_file import block_format
from pagedserve.model_executor.gguf_weights import QuantizedTensor
from pagedserve.model_executor.layers.quantization import gguf_kquants, gguf_q4_q8
from pagedserve.model_executor.layers.quantization.base import (
    EmbeddingMethod,
    KernelLinearMethod,
    LinearMethod,
    QuantizableLayer,
    WeightItem,
    copy_rows,
)
from pagedserve.model_executor.layers.quantization.config import Checkpoint, QuantizationConfig
from pagedserve.model_executor.layers.quantization.unquantized import (
    UnquantizedEmbeddingMethod,
    UnquantizedLinearMethod,
)

logger = logging.getLogger("pagedserve")

_FAMILIES = {ggml_type: family for family in (gguf_q4_q8, gguf_kquants) for ggml_type in family.FORMATS}
KERNEL_TYPES = frozenset(_FAMILIES)  # ggml types with a kernel
_FLOATS = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def empty_blocks(rows: int, in_features: int, ggml_type: int) -> torch.Tensor:
    block_size, type_size = block_format(ggml_type)
    if in_features % block_size:
        raise ValueError(f"in_features {in_features} is not a multiple of the block size {block_size}")
    return torch.empty(rows, in_features // block_size * type_size, dtype=torch.uint8)


def _blocks_of(item: WeightItem, ggml_type: int) -> torch.Tensor:
    if not isinstance(item, QuantizedTensor) or item.ggml_type != ggml_type:
        raise ValueError("the checkpoint tensor has no quantized layer of its type")
    return item.blocks


class GGUFLinearMethod(KernelLinearMethod):
    """One ggml type for the whole (possibly fused) weight: `blocks` uint8 [out_features, bytes per row]."""

    def __init__(self, ggml_type: int) -> None:
        self.ggml_type = ggml_type

    def create_weights(self, layer: QuantizableLayer) -> None:
        layer.register_buffer("blocks", empty_blocks(layer.out_features, layer.in_features, self.ggml_type))

    def load_weight(self, layer: QuantizableLayer, item: WeightItem, shard: int | None) -> None:
        copy_rows(layer.blocks, _blocks_of(item, self.ggml_type), layer.local_sizes, shard)

    def matmul(self, layer: QuantizableLayer, rows: torch.Tensor) -> torch.Tensor:
        return _FAMILIES[self.ggml_type].matmul(rows, layer.blocks, self.ggml_type, layer.out_features)


class GGUFPartsMethod(KernelLinearMethod):
    """A fused projection whose parts (q, k, v or gate, up) have different ggml types: part i's blocks are
    `blocks{i}`, and the parts' outputs are concatenated."""

    def __init__(self, part_types: list[int]) -> None:
        self.part_types = part_types  # in shard order

    def create_weights(self, layer: QuantizableLayer) -> None:
        for i, (rows, ggml_type) in enumerate(zip(layer.local_sizes, self.part_types, strict=True)):
            layer.register_buffer(f"blocks{i}", empty_blocks(rows, layer.in_features, ggml_type))

    def load_weight(self, layer: QuantizableLayer, item: WeightItem, shard: int | None) -> None:
        if shard is None:
            raise ValueError("a fused projection of mixed types is loaded part by part")
        copy_rows(getattr(layer, f"blocks{shard}"), _blocks_of(item, self.part_types[shard]), (), None)

    def matmul(self, layer: QuantizableLayer, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([_FAMILIES[ggml_type].matmul(rows, getattr(layer, f"blocks{i}"), ggml_type, n)
                          for i, (ggml_type, n) in enumerate(zip(self.part_types, layer.local_sizes))], dim=-1)


class GGUFEmbeddingMethod(EmbeddingMethod):
    """An embedding table kept in its blocks: the rows of a step's tokens are dequantized as they are looked up."""

    def __init__(self, ggml_type: int) -> None:
        self.ggml_type = ggml_type
        self.dtype = torch.get_default_dtype()  # the model's, while it is built

    def create_weights(self, layer: QuantizableLayer) -> None:
        layer.register_buffer("blocks", empty_blocks(layer.out_features, layer.in_features, self.ggml_type))

    def load_weight(self, layer: QuantizableLayer, item: WeightItem, shard: int | None) -> None:
        copy_rows(layer.blocks, _blocks_of(item, self.ggml_type), layer.local_sizes, shard)

    def embedding(self, layer: QuantizableLayer, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = _FAMILIES[self.ggml_type].dequantize(layer.blocks[flat], self.ggml_type, flat.numel(),
                                                    layer.in_features, self.dtype)
        return rows.view(*ids.shape, layer.in_features)

    def tied_head_method(self) -> LinearMethod:
        return GGUFLinearMethod(self.ggml_type)


class GGUFConfig(QuantizationConfig):
    """Keeps the file's blocks for every weight that has a kernel: the linear layers, the embedding and the head
    (its own blocks, or, tied, the embedding's). Everything else (norms, float tensors, types without a kernel)
    is dequantized as without quantization."""

    def __init__(self, types: dict[str, int], parts: dict[str, list[tuple[int | None, int, str]]]) -> None:
        """`types`: the file's tensors' ggml types by name; `parts`: module name -> (shard, ggml type, checkpoint
        name) of each checkpoint tensor of its weight."""
        self.types, self.parts = types, parts
        self.kept: set[str] = set()

    @classmethod
    def from_checkpoint(cls, method: str, checkpoint: Checkpoint) -> "GGUFConfig":
        types = checkpoint.gguf_tensor_types()
        parts: dict[str, list[tuple[int | None, int, str]]] = {}
        for checkpoint_name, ggml_type in types.items():
            name, expert, shard = checkpoint.target(checkpoint_name)
            if expert is None and name.endswith(".weight"):
                parts.setdefault(name.removesuffix(".weight"), []).append((shard, ggml_type, checkpoint_name))
        return cls(types, parts)

    def _kept_types(self, prefix: str) -> list[tuple[int | None, int]] | None:
        """(shard, type) of each part of the layer's weight, if every part has a kernel (they are then kept)."""
        parts = self.parts.get(prefix, [])
        if not parts or not {ggml_type for _, ggml_type, _ in parts} <= KERNEL_TYPES:
            return None
        self.kept.update(checkpoint_name for _, _, checkpoint_name in parts)
        return [(shard, ggml_type) for shard, ggml_type, _ in parts]

    def linear_method(self, layer: QuantizableLayer, prefix: str) -> LinearMethod:
        parts = self._kept_types(prefix)
        if parts is None:
            return UnquantizedLinearMethod()
        if len({ggml_type for _, ggml_type in parts}) == 1:
            return GGUFLinearMethod(parts[0][1])
        return GGUFPartsMethod([ggml_type for _, ggml_type in sorted(parts, key=lambda part: part[0] or 0)])

    def embedding_method(self, layer: QuantizableLayer, prefix: str) -> EmbeddingMethod:
        parts = self._kept_types(prefix)
        return UnquantizedEmbeddingMethod() if parts is None else GGUFEmbeddingMethod(parts[0][1])

    def quantized_tensor_names(self) -> set[str]:
        return self.kept

    def check_built(self, model_name: str) -> None:
        kept = self.kept
        dequantized = Counter(GGMLQuantizationType(t).name for c, t in self.types.items()
                              if c not in kept and t not in _FLOATS)
        logger.info("GGUF weights: %d weights kept quantized (%s); dequantized for lack of a kernel: %s",
                    len(kept), ", ".join(sorted({GGMLQuantizationType(self.types[c]).name for c in kept})) or "none",
                    ", ".join(f"{k} ({n} tensors)" for k, n in sorted(dequantized.items())) or "none")
