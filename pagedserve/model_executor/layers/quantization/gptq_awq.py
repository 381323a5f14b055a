"""Pre-quantized 4-bit GPTQ and AWQ checkpoints: which layers are int4 (`CheckpointInt4Config`), and each
projection's tensors converted to the int4 kernels' rows (w = (q - zero) * scale per group along K, as both
formats define it).

Checkpoint layouts (as vLLM reads them: `auto_gptq.py`, `auto_awq.py`'s AWQ -> GPTQ repacking,
`awq_triton.py`'s dequantize kernel, `utils/quant_utils.py`'s `pack_rows` / `pack_cols` / `awq_pack`):
- GPTQ: `qweight` int32 [K / 8, N], 8 nibbles along K, lowest bits first; `qzeros` int32 [K / G, N / 8], 8
  nibbles along N; `scales` fp16 [K / G, N]; `g_idx` int32 [K], the group of each input. `checkpoint_format`
  "gptq" (v1) stores zero - 1 (the historical off-by-one every GPTQ kernel adds back), "gptq_v2" the zero.
  `sym=True` means every zero is 8 (vLLM's uint4b8 type ignores qzeros).
- AWQ (GEMM): `qweight` int32 [K, N / 8] and `qzeros` int32 [K / G, N / 8], 8 nibbles along N in the order
  [0, 2, 4, 6, 1, 3, 5, 7] (nibble p holds column 8 j + order[p]); `scales` fp16 [K / G, N].
GPTQ with `desc_act=True` and groups (act-order: `g_idx` is a permutation of the groups, so a group is no run of
consecutive inputs) has no native kernel here; those projections are dequantized to float at load.
"""

import logging
from collections.abc import Iterator, Mapping
from typing import cast

import torch

from pagedserve.checkpoint_quantization import (
    CheckpointQuantization,
    parse_config,
    quantization_config,
)
from pagedserve.model_executor.layers.quantization import int_quant
from pagedserve.model_executor.layers.quantization.base import (
    ExpertsLayer,
    ExpertsMethod,
    Int4Rows,
    LinearMethod,
    QuantizableLayer,
)
from pagedserve.model_executor.layers.quantization.config import Checkpoint, QuantizationConfig, Weights
from pagedserve.model_executor.layers.quantization.int_linear import (
    Int4CheckpointExperts,
    Int4CheckpointMethod,
    Int4Format,
)

logger = logging.getLogger("pagedserve")

SUFFIXES = frozenset({"qweight", "qzeros", "scales", "g_idx"})  # a quantized projection's tensors
_AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # column 8 j + i is nibble _AWQ_REVERSE_ORDER[i]


def check_tensors(quant: CheckpointQuantization, prefix: str, suffixes: set[str]) -> None:
    """A projection's tensor names are complete: qweight and scales, qzeros where zeros are stored."""
    needed = {"qweight", "scales"} | (set() if quant.symmetric else {"qzeros"})
    if missing := needed - suffixes:
        raise ValueError(f"{quant.method.upper()} checkpoint: {prefix} has no {', '.join(sorted(missing))}")


def convert(
    weights: Iterator[tuple[str, torch.Tensor]], quant: CheckpointQuantization, layout: Mapping[str, set[str]]
) -> Iterator[tuple[str, torch.Tensor | Int4Rows]]:
    """Stream a checkpoint, holding each quantized projection's tensors (`layout`: projection prefix -> the
    suffixes it has) until all arrived, then yield `prefix.weight` as Int4Rows (or as a float tensor where act-order
    has no kernel). Other tensors pass through."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, suffix = name.rpartition(".")
        if prefix not in layout or suffix not in SUFFIXES:
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[suffix] = tensor
        if parts.keys() == layout[prefix]:
            del pending[prefix]
            yield f"{prefix}.weight", convert_projection(quant, prefix, parts)
    if pending:
        raise ValueError(f"{quant.method.upper()} checkpoint: incomplete projections {sorted(pending)[:4]}")


def convert_projection(
    quant: CheckpointQuantization, prefix: str, tensors: Mapping[str, torch.Tensor]
) -> torch.Tensor | Int4Rows:
    """One projection's checkpoint tensors -> its int4 rows; under act-order, its float weight [N, K]."""
    q, scales, zeros = (_unpack_gptq if quant.method == "gptq" else _unpack_awq)(quant, prefix, tensors)
    k = q.shape[1]
    in_order = torch.arange(k) // quant.group_of(k)
    g_idx = tensors["g_idx"].long() if "g_idx" in tensors else in_order
    if g_idx.shape != (k,) or not 0 <= int(g_idx.min()) <= int(g_idx.max()) < scales.shape[1]:
        raise ValueError(f"GPTQ checkpoint: {prefix}.g_idx does not name a group of each of the {k} inputs")
    if quant.act_order:
        return (q.float() - zeros.float()[:, g_idx]) * scales[:, g_idx]
    if not torch.equal(g_idx, in_order):
        raise ValueError(f"GPTQ checkpoint: {prefix}.g_idx is not in order although desc_act is false")
    return Int4Rows(int_quant.pack_int4(q), scales, zeros)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> uint8 [..., C, 8]: the 8 nibbles of each, lowest bits first (read as bytes, which are
    little-endian on every platform torch runs on: byte b holds nibbles 2 b and 2 b + 1)."""
    data = packed.to(torch.int32).contiguous().view(torch.uint8).view(*packed.shape, 4)
    return torch.stack((data & 0xF, data >> 4), dim=-1).view(*packed.shape, 8)


def _unpack_gptq(
    quant: CheckpointQuantization, prefix: str, tensors: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [N, K], scales float32 [N, groups], zeros uint8 [N, groups])."""
    qweight, scales = tensors["qweight"], tensors["scales"]
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    groups = _check_scales(quant, prefix, scales, k, n)
    q = _nibbles(qweight.t()).view(n, k)  # [N, K / 8, 8]: K in order
    if quant.symmetric:
        zeros = torch.full((n, groups), 8, dtype=torch.uint8)
    else:
        _check_shape(prefix, "qzeros", tensors["qzeros"], (groups, n // 8))
        zeros = (_nibbles(tensors["qzeros"]).reshape(groups, n) + quant.zero_offset).t()
    return q.contiguous(), scales.float().t().contiguous(), zeros.contiguous()


def _unpack_awq(
    quant: CheckpointQuantization, prefix: str, tensors: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qweight, scales = tensors["qweight"], tensors["scales"]
    k, n = qweight.shape[0], qweight.shape[1] * 8
    groups = _check_scales(quant, prefix, scales, k, n)
    _check_shape(prefix, "qzeros", tensors["qzeros"], (groups, n // 8))
    q = _nibbles(qweight)[..., _AWQ_REVERSE_ORDER].reshape(k, n).t()
    zeros = _nibbles(tensors["qzeros"])[..., _AWQ_REVERSE_ORDER].reshape(groups, n).t()
    return q.contiguous(), scales.float().t().contiguous(), zeros.contiguous()


def _check_scales(quant: CheckpointQuantization, prefix: str, scales: torch.Tensor, k: int, n: int) -> int:
    group_size = quant.group_of(k)
    if k % group_size:
        raise ValueError(f"{quant.method.upper()} checkpoint: {prefix} has {k} inputs, no multiple of group_size "
                         f"{group_size}")
    _check_shape(prefix, "scales", scales, (k // group_size, n))
    return k // group_size


def _check_shape(prefix: str, suffix: str, tensor: torch.Tensor, shape: tuple[int, int]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{prefix}.{suffix} has shape {tuple(tensor.shape)}, expected {shape}")


class CheckpointInt4Config(QuantizationConfig):
    """A GPTQ / AWQ checkpoint (`quantization_config` in its config.json): each projection it quantizes is built as
    an int4 layer (MoE experts as int4 experts) that its converted tensors fill; what it keeps float
    (`modules_to_not_convert`, usually the head) stays float. Under act-order every projection is float."""

    def __init__(self, quant: CheckpointQuantization, layout: dict[str, set[str]], linears: dict[str, str],
                 experts: dict[str, str]) -> None:
        """`layout`: quantized projection prefix -> its tensors' suffixes; `linears`, `experts`: the int4 layers'
        module names -> a checkpoint prefix of theirs."""
        self.quant, self.layout, self.linears, self.experts = quant, layout, linears, experts
        self.built: set[str] = set()

    @classmethod
    def from_checkpoint(cls, method: str, checkpoint: Checkpoint) -> "CheckpointInt4Config":
        quant = parse_config(quantization_config(checkpoint.hf_config) or {})
        layout: dict[str, set[str]] = {}
        for name in checkpoint.tensor_names():
            prefix, _, suffix = name.rpartition(".")
            if suffix in SUFFIXES:
                layout.setdefault(prefix, set()).add(suffix)
        for prefix, suffixes in layout.items():
            check_tensors(quant, prefix, suffixes)
        linears: dict[str, str] = {}
        experts: dict[str, str] = {}
        if not quant.act_order:
            for prefix in layout:
                name, expert, _ = checkpoint.target(f"{prefix}.weight")
                if expert is None:
                    linears[name.removesuffix(".weight")] = prefix
                else:
                    experts[name.rpartition(".")[0]] = prefix
        return cls(quant, layout, linears, experts)

    def linear_method(self, layer: QuantizableLayer, prefix: str) -> LinearMethod:
        if prefix not in self.linears:
            return super().linear_method(layer, prefix)
        self.built.add(prefix)
        return Int4CheckpointMethod(self.quant.group_of(layer.in_features))

    def experts_method(self, layer: ExpertsLayer, prefix: str) -> ExpertsMethod:
        if prefix not in self.experts:
            return super().experts_method(layer, prefix)
        self.built.add(prefix)
        return Int4CheckpointExperts(Int4Format(self.quant.group_of(layer.hidden_size)),
                                     Int4Format(self.quant.group_of(layer.intermediate_size)))

    def check_built(self, model_name: str) -> None:
        method = self.quant.method.upper()
        for module, prefix in {**self.linears, **self.experts}.items():
            if module not in self.built:
                raise ValueError(f"{method} checkpoint: {prefix} has no linear layer in {model_name}")
        if self.quant.act_order:
            logger.info("GPTQ desc_act=True: %d projections dequantized to float at load (act-order groups have no "
                        "int4 kernel; vLLM refuses such checkpoints)", len(self.layout))
        else:
            logger.info("%s weights: %d projections kept int4 (group size %s)", method, len(self.layout),
                        self.quant.group_size or "per row")

    def convert_weights(self, weights: Weights) -> Weights:
        return convert(cast(Iterator[tuple[str, torch.Tensor]], weights), self.quant, self.layout)
