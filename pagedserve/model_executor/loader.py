"""Checkpoint -> model: safetensors (memory-mapped, shard by shard) or GGUF, into fused parameters; integer
weights quantized at load (int8 / int4) or read from GPTQ / AWQ checkpoints."""

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import cast

import torch
from gguf import GGMLQuantizationType
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from pagedserve.config import EngineConfig
from pagedserve.distributed.parallel_state import tp_size
from pagedserve.model_executor import checkpoint_quantization, gguf_loader
from pagedserve.model_executor.checkpoint_quantization import CheckpointQuantization
from pagedserve.model_executor.gguf_loader import QuantizedTensor
from pagedserve.model_executor.layers.linear import can_pack, pack_linears
from pagedserve.model_executor.layers.moe import FusedExperts
from pagedserve.model_executor.layers.parallel import fused_layouts
from pagedserve.model_executor.layers.quantization import gptq_awq
from pagedserve.model_executor.layers.quantization.gguf import KERNEL_TYPES, GGUFEmbedding, GGUFLinear, GGUFParts
from pagedserve.model_executor.layers.quantization.gptq_awq import Int4Rows
from pagedserve.model_executor.layers.quantization.int_linear import (
    INT_METHODS,
    Int4Linear,
    QuantizedExperts,
    empty_int4_experts,
    quantize_model,
)
from pagedserve.model_executor.registry import CausalLM, model_class

logger = logging.getLogger("pagedserve")


def _safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights in {model_dir}")
    return [os.path.join(model_dir, name) for name in files]


def _open(path: str) -> safe_open:
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # a truncated or corrupt file: say which one
        raise ValueError(f"cannot read the weights in {path}: {e}") from e


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in _safetensors_files(model_dir):
        with _open(path) as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def safetensors_names(model_dir: str) -> list[str]:
    """The checkpoint's tensor names, read from the file headers only."""
    names: list[str] = []
    for path in _safetensors_files(model_dir):
        with _open(path) as f:
            names += f.keys()
    return names


_EXPERT_WEIGHT = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")


def checkpoint_target(model: nn.Module, name: str) -> tuple[str, int | None, int | None]:
    """Checkpoint tensor name -> (our parameter name, expert index, shard index in the fused parameter).

    The model class may declare `checkpoint_renames` (fragment -> fragment, applied first), `expert_params`
    (a per-expert projection `...experts.{e}.{proj}.weight` -> (fused 3-D parameter, shard)) and
    `stacked_params` (projection fragment -> (fused parameter, shard)). A tensor already in the fused
    layout (transformers 5's `experts.gate_up_proj`) matches its parameter by name.
    """
    for old, new in getattr(model, "checkpoint_renames", {}).items():
        name = name.replace(old, new)
    match = _EXPERT_WEIGHT.search(name)
    expert_params = getattr(model, "expert_params", {})
    if match and match.group(2) in expert_params:
        fused, shard = expert_params[match.group(2)]
        return f"{name[: match.start()]}.experts.{fused}", int(match.group(1)), shard
    for fragment, (fused, shard) in getattr(model, "stacked_params", {}).items():
        if f".{fragment}." in name:
            return name.replace(f".{fragment}.", f".{fused}."), None, shard
    return name, None, None


WeightItem = torch.Tensor | QuantizedTensor | Int4Rows
Convert = Callable[[Iterator[tuple[str, torch.Tensor]]], Iterator[tuple[str, WeightItem]]]


def load_weights(model: nn.Module, weights: Iterator[tuple[str, WeightItem]], convert: Convert | None = None,
                 layouts: dict[str, list[int]] | None = None) -> None:
    """Copy checkpoint tensors into the model, routing q/k/v, gate/up and per-expert tensors into fused parameters
    (a QuantizedTensor's blocks into its GGUFLinear's rows, Int4Rows into an Int4Linear's buffers). `convert`
    turns the (renamed) checkpoint tensors into those items (GPTQ / AWQ). Under tensor parallelism each layer cuts
    this rank's piece out of a float tensor (`checkpoint_slice`), and experts of other ranks are skipped. `layouts`:
    the fused projections' rows per part (`parallel.fused_layouts`), taken before any layer was swapped."""
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules(remove_duplicate=False))
    layouts = fused_layouts(model) if layouts is None else layouts
    gguf = _gguf_layers(model)
    int4 = {name: m for name, m in modules.items() if isinstance(m, Int4Linear)}
    loaded: set[str] = set()
    map_checkpoint = getattr(model, "map_checkpoint", None)
    if map_checkpoint is not None:  # a layout that differs beyond names (GPT-2's transposed Conv1D)
        weights = map_checkpoint(weights)
    if convert is not None:
        weights = convert(cast(Iterator[tuple[str, torch.Tensor]], weights))
    for checkpoint_name, item in tqdm(weights, desc="Loading weights", unit="tensor", leave=False):
        if "rotary_emb.inv_freq" in checkpoint_name:
            continue
        name, expert, shard = checkpoint_target(model, checkpoint_name)
        owner_name, _, param_name = name.rpartition(".")
        owner = modules.get(owner_name)
        pairs: list[tuple[torch.Tensor, torch.Tensor]]
        row_range = shard
        if isinstance(item, QuantizedTensor):
            blocks_layer: nn.Module | None = gguf.get(name)
            if isinstance(blocks_layer, GGUFParts) and shard is not None:  # each part is a layer of its own
                blocks_layer, row_range = blocks_layer.parts[shard], None
            if not isinstance(blocks_layer, (GGUFLinear, GGUFEmbedding)) or blocks_layer.ggml_type != item.ggml_type:
                raise ValueError(f"checkpoint tensor {checkpoint_name!r} has no quantized layer of its type")
            pairs = [(blocks_layer.blocks, item.blocks)]
        elif isinstance(item, Int4Rows):
            layer = int4.get(name.removesuffix(".weight") if expert is None else f"{name}.{expert}")
            if layer is None:
                raise ValueError(f"checkpoint projection {checkpoint_name!r} has no int4 layer in the model")
            pairs = [(layer.packed, item.packed), (layer.scales, item.scales), (layer.zeros, item.zeros)]
        elif name not in params:
            if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
                continue
            raise ValueError(f"checkpoint tensor {checkpoint_name!r} has no place in {type(model).__name__}")
        else:
            if expert is not None:  # experts are split by rank: another rank's expert is not loaded here
                first, held = getattr(owner, "first_expert", 0), getattr(owner, "num_experts", 0)
                if not first <= expert < first + held and expert < held * tp_size():
                    continue
                expert -= first
            elif owner is not None and hasattr(owner, "checkpoint_slice"):
                item = owner.checkpoint_slice(item, param_name, shard)
            pairs = [(params[name].data, item)]
        for dest, tensor in pairs:
            if expert is not None and not isinstance(item, Int4Rows):  # an Int4Linear is already one expert's
                if expert >= dest.shape[0]:
                    raise ValueError(f"{checkpoint_name}: expert {expert} is out of range (the model has "
                                     f"{dest.shape[0]})")
                dest = dest[expert]
            if row_range is not None:
                sizes = layouts.get(owner_name) or [dest.shape[0] // 2] * 2  # an expert's gate/up: halves
                offset = sum(sizes[:row_range])
                dest = dest[offset : offset + sizes[row_range]]
            if dest.shape != tensor.shape:
                raise ValueError(f"{checkpoint_name}: checkpoint shape {tuple(tensor.shape)} != model "
                                 f"{tuple(dest.shape)}")
            dest.copy_(tensor)
        loaded.add(_part_name(name, expert, shard))
    _check_all_loaded(model, _loadable_sizes(model, params), loaded)


def _loadable_sizes(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """What the checkpoint must fill, by loader name: its first dimension (the expert count for experts)."""
    sizes = {name: p.shape[0] if p.dim() else 1 for name, p in params.items()}
    sizes.update({name: layer.blocks.shape[0] if isinstance(layer, (GGUFLinear, GGUFEmbedding)) else 1
                  for name, layer in _gguf_layers(model).items()})
    for name, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            sizes[f"{name}.gate_up_proj"] = sizes[f"{name}.down_proj"] = module.num_experts
        elif isinstance(module, Int4Linear) and ".experts." not in f".{name}.":
            sizes[f"{name}.weight"] = module.out_features
    return sizes


def _gguf_layers(model: nn.Module) -> dict[str, GGUFLinear | GGUFEmbedding | GGUFParts]:
    """The layers that hold GGUF blocks, by the name of the weight they replace (a GGUFParts' own parts are its)."""
    layers: dict[str, GGUFLinear | GGUFEmbedding | GGUFParts] = {}
    for name, module in model.named_modules():
        if isinstance(module, (GGUFLinear, GGUFEmbedding, GGUFParts)) and ".parts." not in f"{name}.":
            layers[f"{name}.weight"] = module
    return layers


def _part_name(name: str, expert: int | None, shard: int | None) -> str:
    """How a loaded piece of a parameter is recorded: `name`, `name#shard`, `name@expert` or `name@expert#shard`."""
    return name + ("" if expert is None else f"@{expert}") + ("" if shard is None else f"#{shard}")


def _expected_parts(model: nn.Module, name: str, size: int) -> list[str]:
    """The pieces a checkpoint must provide for a parameter (of first dimension `size`) it does not provide whole."""
    experts: list[int | None] = [None]
    expert_params = getattr(model, "expert_params", {}).values()
    expert_shards = [s for fused, s in expert_params if name.endswith(f".experts.{fused}")]
    if expert_shards:
        experts, shards = list(range(size)), expert_shards
    else:
        shards = [s for fused, s in getattr(model, "stacked_params", {}).values() if f".{fused}." in name]
    return [_part_name(name, e, s) for e in experts for s in shards or [None]]


def _check_all_loaded(model: nn.Module, sizes: dict[str, int], loaded: set[str]) -> None:
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = []
    for name, size in sizes.items():
        if (tied and name == "lm_head.weight") or name in loaded:
            continue
        missing += [part for part in _expected_parts(model, name, size) if part not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def quantize_linears(model: nn.Module, gguf_path: str) -> set[str]:
    """Keep the file's blocks for every weight that has a kernel: decoder-layer linears (GGUFLinear; a fused
    q/k/v or gate/up whose parts differ in type, GGUFParts), the embedding (GGUFEmbedding) and the head (its own
    GGUFLinear, or, tied, one reading the embedding's blocks). Return the checkpoint names that stay quantized;
    everything else (norms, float tensors, types without a kernel) is dequantized as without quantization."""
    types = gguf_loader.tensor_types(gguf_path)
    layouts = fused_layouts(model)
    parts: dict[str, list[str]] = {}
    for checkpoint_name in types:
        name, expert, _ = checkpoint_target(model, checkpoint_name)
        if expert is None and name.endswith(".weight"):
            parts.setdefault(name, []).append(checkpoint_name)
    kept: set[str] = set()
    for name, checkpoint_names in parts.items():
        module_name = name.removesuffix(".weight")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        kinds = [types[c] for c in checkpoint_names]
        if not set(kinds) <= KERNEL_TYPES or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        new: nn.Module
        if isinstance(module, nn.Embedding):
            new = GGUFEmbedding(module, kinds[0])
            head = getattr(model, "lm_head", None)
            if isinstance(head, nn.Linear) and head.weight is module.weight:  # tied: the head reads these blocks
                model.lm_head = new.tied_head(head)
        elif len(set(kinds)) == 1:
            new = GGUFLinear(module, kinds[0])
        else:
            shards = [checkpoint_target(model, c)[2] for c in checkpoint_names]
            sizes = layouts[module_name]
            new = GGUFParts(module, [(sizes[s], t) for s, t in sorted(zip(cast(list[int], shards), kinds))])
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        kept.update(checkpoint_names)
    floats = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    dequantized = Counter(GGMLQuantizationType(t).name for c, t in types.items() if c not in kept and t not in floats)
    logger.info("GGUF weights: %d weights kept quantized (%s); dequantized for lack of a kernel: %s",
                len(kept), ", ".join(sorted({GGMLQuantizationType(types[c]).name for c in kept})) or "none",
                ", ".join(f"{k} ({n} tensors)" for k, n in sorted(dequantized.items())) or "none")
    return kept


def checkpoint_int4(model: nn.Module, quant: CheckpointQuantization, names: list[str]) -> Convert:
    """Swap each linear layer (and MoE experts) the GPTQ / AWQ checkpoint quantizes for an empty Int4Linear
    (QuantizedExperts); return the converter of the checkpoint's tensors into their rows. Projections the
    checkpoint keeps in float (`modules_to_not_convert`, the head) stay float; under act-order all stay float."""
    map_checkpoint = getattr(model, "map_checkpoint", None)
    if map_checkpoint is not None:  # names as load_weights will see them
        names = [name for name, _ in map_checkpoint((n, torch.empty(0, device="meta")) for n in names)]
    layout: dict[str, set[str]] = {}
    for name in names:
        prefix, _, suffix = name.rpartition(".")
        if suffix in gptq_awq.SUFFIXES:
            layout.setdefault(prefix, set()).add(suffix)
    for prefix, suffixes in layout.items():
        gptq_awq.check_tensors(quant, prefix, suffixes)
    if quant.act_order:
        logger.info("GPTQ desc_act=True: %d projections dequantized to float at load (act-order groups have no "
                    "int4 kernel; vLLM refuses such checkpoints)", len(layout))
    else:
        for prefix in layout:
            _swap_for_int4(model, quant, prefix)
        logger.info("%s weights: %d projections kept int4 (group size %s)", quant.method.upper(), len(layout),
                    quant.group_size or "per row")
    return lambda weights: gptq_awq.convert(weights, quant, layout)


def _swap_for_int4(model: nn.Module, quant: CheckpointQuantization, prefix: str) -> None:
    name, expert, _ = checkpoint_target(model, f"{prefix}.weight")
    module_name = name.removesuffix(".weight") if expert is None else name.rpartition(".")[0]
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if isinstance(module, (Int4Linear, QuantizedExperts)):
        return  # another part of the same fused layer
    if expert is None and isinstance(module, nn.Linear):
        k = module.in_features
        new: nn.Module = Int4Linear(k, module.out_features, quant.group_of(k), module.bias, module.weight.device)
    elif expert is not None and isinstance(module, FusedExperts):
        new = empty_int4_experts(module, quant.group_size)
    else:
        raise ValueError(f"{quant.method.upper()} checkpoint: {prefix} has no linear layer in {type(model).__name__}")
    parent, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def load_model(config: EngineConfig) -> CausalLM:
    cls = model_class(config.hf_config)
    torch.set_default_dtype(config.dtype)
    try:
        with torch.device("meta"):
            model = cls(config.hf_config, config.max_model_len)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to_empty(device=config.device)
    cast(CausalLM, model).tie_weights()
    layouts = fused_layouts(model)
    if config.gguf_path:
        keep = quantize_linears(model, config.gguf_path) if config.quantization == "gguf" else set()
        load_weights(model, gguf_loader.iter_gguf_tensors(config.gguf_path, config.dtype, keep), layouts=layouts)
    else:
        convert = None
        if config.quantization in checkpoint_quantization.METHODS:
            quant = checkpoint_quantization.parse_config(
                checkpoint_quantization.quantization_config(config.hf_config) or {})
            convert = checkpoint_int4(model, quant, safetensors_names(config.model_path))
        load_weights(model, iter_safetensors(config.model_path), convert, layouts)
        if config.quantization in INT_METHODS:
            done, kept = quantize_model(model, config.quantization)
            logger.info("%s quantization at load: %d layers quantized; %d kept float (no int4 group size fits "
                        "their width); embeddings, norms and the head stay float", config.quantization, done, kept)
    if can_pack(config.device, config.dtype):
        pack_linears(model)
    return cast(CausalLM, model.eval())
