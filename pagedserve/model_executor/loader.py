"""Checkpoint -> model: safetensors (memory-mapped, shard by shard) or GGUF, into fused parameters."""

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from typing import cast

import torch
from gguf import GGMLQuantizationType
from safetensors import safe_open
from torch import nn
from tqdm import tqdm
from transformers import PretrainedConfig

from pagedserve.config import EngineConfig
from pagedserve.model_executor import gguf_loader
from pagedserve.model_executor.gguf_loader import QuantizedTensor
from pagedserve.model_executor.layers.linear import can_pack, pack_linears
from pagedserve.model_executor.layers.quantization.gguf import KERNEL_TYPES, GGUFLinear
from pagedserve.model_executor.registry import CausalLM, model_class

logger = logging.getLogger("pagedserve")


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights in {model_dir}")
    for name in files:
        path = os.path.join(model_dir, name)
        try:
            handle = safe_open(path, framework="pt")
        except Exception as e:  # a truncated or corrupt file: say which one
            raise ValueError(f"cannot read the weights in {path}: {e}") from e
        with handle as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


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


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor | QuantizedTensor]]) -> None:
    """Copy checkpoint tensors into the model, routing q/k/v, gate/up and per-expert tensors into fused parameters
    (a QuantizedTensor's blocks into its GGUFLinear's rows)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    quantized = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, GGUFLinear)}
    loaded: set[str] = set()
    map_checkpoint = getattr(model, "map_checkpoint", None)
    if map_checkpoint is not None:  # a layout that differs beyond names (GPT-2's transposed Conv1D)
        weights = map_checkpoint(weights)
    for checkpoint_name, item in tqdm(weights, desc="Loading weights", unit="tensor", leave=False):
        if "rotary_emb.inv_freq" in checkpoint_name:
            continue
        name, expert, shard = checkpoint_target(model, checkpoint_name)
        if isinstance(item, QuantizedTensor):
            if name not in quantized or quantized[name].ggml_type != item.ggml_type:
                raise ValueError(f"checkpoint tensor {checkpoint_name!r} has no quantized layer of its type")
            dest, tensor = quantized[name].blocks, item.blocks
        elif name not in params:
            if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
                continue
            raise ValueError(f"checkpoint tensor {checkpoint_name!r} has no place in {type(model).__name__}")
        else:
            dest, tensor = params[name].data, item
        if expert is not None:
            if expert >= dest.shape[0]:
                raise ValueError(f"{checkpoint_name}: expert {expert} is out of range (the model has {dest.shape[0]})")
            dest = dest[expert]
        if shard is not None:
            sizes = _shard_sizes(model, name, dest.shape[0])
            offset = sum(sizes[:shard])
            dest = dest[offset : offset + sizes[shard]]
        if dest.shape != tensor.shape:
            raise ValueError(f"{checkpoint_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dest.shape)}")
        dest.copy_(tensor)
        loaded.add(_part_name(name, expert, shard))
    _check_all_loaded(model, {**params, **{name: m.blocks for name, m in quantized.items()}}, loaded)


def _part_name(name: str, expert: int | None, shard: int | None) -> str:
    """How a loaded piece of a parameter is recorded: `name`, `name#shard`, `name@expert` or `name@expert#shard`."""
    return name + ("" if expert is None else f"@{expert}") + ("" if shard is None else f"#{shard}")


def _shard_sizes(model: nn.Module, fused_name: str, rows: int) -> list[int]:
    """Row counts of the shards stacked in a fused parameter of `rows` rows: q, k, v or gate, up."""
    config = cast(PretrainedConfig, model.config)
    if ".qkv_proj." in fused_name:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return [config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    return [rows // 2, rows // 2]


def _expected_parts(model: nn.Module, name: str, param: torch.Tensor) -> list[str]:
    """The pieces a checkpoint must provide for a parameter it does not provide whole."""
    experts: list[int | None] = [None]
    expert_params = getattr(model, "expert_params", {}).values()
    expert_shards = [s for fused, s in expert_params if name.endswith(f".experts.{fused}")]
    if expert_shards:
        experts, shards = list(range(param.shape[0])), expert_shards
    else:
        shards = [s for fused, s in getattr(model, "stacked_params", {}).values() if f".{fused}." in name]
    return [_part_name(name, e, s) for e in experts for s in shards or [None]]


def _check_all_loaded(model: nn.Module, params: dict[str, torch.Tensor], loaded: set[str]) -> None:
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = []
    for name, param in params.items():
        if (tied and name == "lm_head.weight") or name in loaded:
            continue
        missing += [part for part in _expected_parts(model, name, param) if part not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def quantize_linears(model: nn.Module, gguf_path: str) -> set[str]:
    """Swap each decoder-layer linear whose checkpoint parts (one, or q/k/v, gate/up) share a ggml type with a
    kernel for a GGUFLinear of that type; return the checkpoint names that stay quantized. Everything else
    (embeddings, norms, a tied head, types without a kernel) is dequantized as without quantization."""
    types = gguf_loader.tensor_types(gguf_path)
    parts: dict[str, list[str]] = {}
    for checkpoint_name in types:
        name, expert, _ = checkpoint_target(model, checkpoint_name)
        if expert is None and ".layers." in name and name.endswith(".weight"):
            parts.setdefault(name, []).append(checkpoint_name)
    kept: set[str] = set()
    for name, checkpoint_names in parts.items():
        module_name = name.removesuffix(".weight")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        kinds = {types[c] for c in checkpoint_names}
        if isinstance(module, nn.Linear) and len(kinds) == 1 and kinds <= KERNEL_TYPES:
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, GGUFLinear(module, GGMLQuantizationType(kinds.pop())))
            kept.update(checkpoint_names)
    floats = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    dequantized = Counter(GGMLQuantizationType(t).name for c, t in types.items() if c not in kept and t not in floats)
    logger.info("GGUF weights: %d linear weights kept quantized (%s); dequantized for lack of a kernel: %s",
                len(kept), ", ".join(sorted({GGMLQuantizationType(types[c]).name for c in kept})) or "none",
                ", ".join(f"{k} ({n} tensors)" for k, n in sorted(dequantized.items())) or "none")
    return kept


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
    weights: Iterator[tuple[str, torch.Tensor | QuantizedTensor]]
    if config.gguf_path:
        keep = quantize_linears(model, config.gguf_path) if config.quantization == "gguf" else set()
        weights = gguf_loader.iter_gguf_tensors(config.gguf_path, config.dtype, keep)
    else:
        weights = iter_safetensors(config.model_path)
    load_weights(model, weights)
    if can_pack(config.device, config.dtype):
        pack_linears(model)
    return cast(CausalLM, model.eval())
