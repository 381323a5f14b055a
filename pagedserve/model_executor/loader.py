"""Checkpoint -> model. The model is built on the meta device, each layer with the quantization method the
checkpoint's `QuantizationConfig` gives it, then allocated on the device and filled tensor by tensor (safetensors
memory-mapped shard by shard, or a GGUF file) through each layer's weight loader, which puts a part of a fused
layer (q/k/v, gate/up, an expert) in its rows; last, each layer processes what it loaded (quantization at load,
packing for oneDNN)."""

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import cast

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm
from transformers import PretrainedConfig

from pagedserve.config import EngineConfig
from pagedserve.model_executor import gguf_weights
from pagedserve.model_executor.layers.linear import LinearBase
from pagedserve.model_executor.layers.moe import FusedExperts
from pagedserve.model_executor.layers.parallel import VocabParallelEmbedding
from pagedserve.model_executor.layers.quantization.base import WeightItem, copy_rows, float_tensor
from pagedserve.model_executor.layers.quantization.registry import config_class
from pagedserve.model_executor.registry import CausalLM, model_class


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


def checkpoint_target(model: type[CausalLM] | CausalLM, name: str) -> tuple[str, int | None, int | None]:
    """Checkpoint tensor name -> (our parameter name, expert index, shard index in the fused parameter).

    The model class's `checkpoint_renames` (fragment -> fragment) apply first; then a per-expert projection
    `...experts.{e}.{proj}.weight` in `expert_params` goes to (its fused 3-D parameter, shard), and a projection
    fragment in `stacked_params` to (its fused parameter, shard). A tensor already in the fused layout
    (transformers 5's `experts.gate_up_proj`) matches its parameter by name.
    """
    for old, new in model.checkpoint_renames.items():
        name = name.replace(old, new)
    match = _EXPERT_WEIGHT.search(name)
    if match and match.group(2) in model.expert_params:
        fused, shard = model.expert_params[match.group(2)]
        return f"{name[: match.start()]}.experts.{fused}", int(match.group(1)), shard
    for fragment, (fused, stacked_shard) in model.stacked_params.items():
        if f".{fragment}." in name:
            return name.replace(f".{fragment}.", f".{fused}."), None, stacked_shard
    return name, None, None


@dataclass
class CheckpointFiles:
    """The checkpoint as a quantization config reads it before the model is built (`quantization.config.Checkpoint`)."""

    model_class: type[CausalLM]
    hf_config: PretrainedConfig
    model_path: str
    gguf_path: str | None

    def tensor_names(self) -> list[str]:
        meta = torch.empty(0, device="meta")  # names only: the model's mapping may transpose
        names = safetensors_names(self.model_path)
        return [name for name, _ in self.model_class.map_checkpoint((name, meta) for name in names)]

    def gguf_tensor_types(self) -> dict[str, int]:
        if self.gguf_path is None:
            raise ValueError("the checkpoint is no GGUF file")
        return gguf_weights.tensor_types(self.gguf_path)

    def target(self, name: str) -> tuple[str, int | None, int | None]:
        return checkpoint_target(self.model_class, name)


Place = FusedExperts | LinearBase | VocabParallelEmbedding | torch.Tensor  # where a checkpoint tensor goes


def _place(modules: Mapping[str, nn.Module], params: Mapping[str, torch.Tensor], name: str) -> Place | None:
    """The layer whose weight loader takes parameter `name`, or the plain parameter itself (a norm's)."""
    owner_name, _, param = name.rpartition(".")
    owner = modules.get(owner_name)
    if isinstance(owner, (FusedExperts, LinearBase, VocabParallelEmbedding)) and param in owner.weight_names():
        return owner
    return params.get(name)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, WeightItem]]) -> None:
    """Copy the checkpoint's tensors into the model: each to the weight loader of the layer that holds it (which
    routes q/k/v, gate/up and experts into their fused layer, and under tensor parallelism cuts this rank's piece),
    a plain parameter (a norm's) directly. Experts of other ranks are skipped."""
    causal_lm = cast(CausalLM, model)
    modules = dict(model.named_modules(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(causal_lm.config, "tie_word_embeddings", False)
    loaded: set[str] = set()
    with torch.no_grad():
        for checkpoint_name, item in tqdm(weights, desc="Loading weights", unit="tensor", leave=False):
            if "rotary_emb.inv_freq" in checkpoint_name:
                continue
            name, expert, shard = checkpoint_target(causal_lm, checkpoint_name)
            place = _place(modules, params, name)
            if place is None or (isinstance(place, torch.Tensor) and expert is not None):
                if name == "lm_head.weight" and tied:
                    continue
                raise ValueError(f"checkpoint tensor {checkpoint_name!r} has no place in {type(model).__name__}")
            param = name.rpartition(".")[2]
            try:
                if isinstance(place, FusedExperts):
                    if expert is not None:
                        expert = place.local_expert(expert)
                        if expert is None:  # another rank's
                            continue
                    place.weight_loader(param, item, expert, shard)
                elif isinstance(place, torch.Tensor):
                    copy_rows(place, float_tensor(item), (), None)
                else:
                    place.weight_loader(param, item, shard)
            except ValueError as e:
                raise ValueError(f"{checkpoint_name}: {e}") from e
            loaded.add(_part_name(name, expert, shard))
    _check_all_loaded(causal_lm, _loadable_sizes(model), loaded)


def _loadable_sizes(model: nn.Module) -> dict[str, int]:
    """What the checkpoint must fill, by loader name: its first dimension (the expert count for experts)."""
    sizes: dict[str, int] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, FusedExperts):
            sizes.update({prefix + param: module.num_experts for param in module.weight_names()})
        elif isinstance(module, (LinearBase, VocabParallelEmbedding)):
            sizes.update({prefix + param: module.out_features for param in module.weight_names()})
        else:
            sizes.update({prefix + name: p.shape[0] if p.dim() else 1 for name, p in module.named_parameters(
                recurse=False)})
    return sizes


def _part_name(name: str, expert: int | None, shard: int | None) -> str:
    """How a loaded piece of a parameter is recorded: `name`, `name#shard`, `name@expert` or `name@expert#shard`."""
    return name + ("" if expert is None else f"@{expert}") + ("" if shard is None else f"#{shard}")


def _expected_parts(model: CausalLM, name: str, size: int) -> list[str]:
    """The pieces a checkpoint must provide for a parameter (of first dimension `size`) it does not provide whole."""
    experts: list[int | None] = [None]
    expert_shards = [s for fused, s in model.expert_params.values() if name.endswith(f".experts.{fused}")]
    shards: list[int | None]
    if expert_shards:
        experts, shards = list(range(size)), expert_shards
    else:
        shards = [s for fused, s in model.stacked_params.values() if f".{fused}." in name]
    return [_part_name(name, e, s) for e in experts for s in shards or [None]]


def _check_all_loaded(model: CausalLM, sizes: dict[str, int], loaded: set[str]) -> None:
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = []
    for name, size in sizes.items():
        if (tied and name == "lm_head.weight") or name in loaded:
            continue
        missing += [part for part in _expected_parts(model, name, size) if part not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def load_model(config: EngineConfig) -> CausalLM:
    cls = model_class(config.hf_config)
    checkpoint = CheckpointFiles(cls, config.hf_config, config.model_path, config.gguf_path)
    quant_config = config_class(config.quantization).from_checkpoint(config.quantization or "", checkpoint)
    torch.set_default_dtype(config.dtype)
    try:
        with torch.device("meta"):
            model = cls(config.hf_config, config.max_model_len, quant_config)
    finally:
        torch.set_default_dtype(torch.float32)
    quant_config.check_built(cls.__name__)
    module = cast(nn.Module, model).to_empty(device=config.device)
    model.tie_weights()
    weights: Iterator[tuple[str, WeightItem]]
    if config.gguf_path:
        weights = gguf_weights.iter_gguf_tensors(config.gguf_path, config.dtype, quant_config.quantized_tensor_names())
    else:
        weights = iter_safetensors(config.model_path)
    load_weights(module, quant_config.convert_weights(cls.map_checkpoint(weights)))
    for layer in module.modules():
        if isinstance(layer, (LinearBase, FusedExperts)):
            layer.process_weights_after_loading()
    return cast(CausalLM, module.eval())
