"""Checkpoint -> model: safetensors (memory-mapped, shard by shard) or GGUF, into fused parameters."""

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from pagedserve.config import EngineConfig
from pagedserve.model_executor import gguf_loader
from pagedserve.model_executor.layers.linear import can_pack, pack_linears
from pagedserve.model_executor.registry import model_class


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
        with safe_open(os.path.join(model_dir, name), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model, routing q/k/v and gate/up into their fused parameters."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    stacked = getattr(model, "stacked_params", {})
    for name, tensor in tqdm(weights, desc="Loading weights", unit="tensor", leave=False):
        if "rotary_emb.inv_freq" in name:
            continue
        shard = None
        for fragment, (fused, index) in stacked.items():
            if f".{fragment}." in name:
                name, shard = name.replace(f".{fragment}.", f".{fused}."), index
                break
        if name not in params:
            if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
                continue
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        param = params[name]
        if shard is None:
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
            param.data.copy_(tensor)
        else:
            sizes = _shard_sizes(model, name)
            offset = sum(sizes[:shard])
            param.data[offset : offset + sizes[shard]].copy_(tensor)
            name = f"{name}#{shard}"
        loaded.add(name)
    _check_all_loaded(model, params, loaded)


def _shard_sizes(model: nn.Module, fused_name: str) -> list[int]:
    config = model.config
    if ".qkv_proj." in fused_name:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return [config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    return [config.intermediate_size, config.intermediate_size]


def _check_all_loaded(model: nn.Module, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = []
    for name in params:
        if tied and name == "lm_head.weight":
            continue
        if any(f".{fused}." in name for fused, _ in model.stacked_params.values()):
            shards = 3 if ".qkv_proj." in name else 2
            missing += [f"{name}#{i}" for i in range(shards) if f"{name}#{i}" not in loaded]
        elif name not in loaded:
            missing.append(name)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def load_model(config: EngineConfig) -> nn.Module:
    cls = model_class(config.hf_config)
    torch.set_default_dtype(config.dtype)
    try:
        with torch.device("meta"):
            model = cls(config.hf_config, config.max_model_len)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to_empty(device=config.device)
    model.tie_weights()
    if config.gguf_path:
        weights = gguf_loader.iter_gguf_tensors(config.gguf_path, config.dtype)
    else:
        weights = iter_safetensors(config.model_path)
    load_weights(model, weights)
    if can_pack(config.device, config.dtype):
        pack_linears(model)
    return model.eval()
