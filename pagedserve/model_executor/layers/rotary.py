"""Rotary position embeddings (rotate-half layout), with `linear`, `llama3` and `longrope` scaling and
partial rotary (only the first `partial_rotary_factor` of each head rotates)."""

import math

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.model_executor.attention.torch_paged import AttentionMetadata


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> dict:
    """The rope settings whichever way the config spells them (transformers 5 `rope_parameters`, or 4.x).

    Configs with a rope per layer type (Gemma 3) nest them by type: `layer_type` picks one.
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if layer_type is not None and layer_type in params:
        params = dict(params[layer_type])
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] == "longrope":  # defaults as transformers' _compute_longrope_parameters
        original = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        params.setdefault("original_max_position_embeddings", original)
        if params.get("factor") is None:
            params["factor"] = config.max_position_embeddings / params["original_max_position_embeddings"]
    return params


def _exponents(rotary_dim: int) -> torch.Tensor:
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim


def _inv_freq(rotary_dim: int, params: dict) -> torch.Tensor:
    base = params["rope_theta"]
    inv_freq = 1.0 / (base ** _exponents(rotary_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        factor = params["factor"]
        low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
        old_context_len = params["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3, longrope)")


def _cos_sin(inv_freq: torch.Tensor, max_position: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32, device="cpu"), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_model_len.

    They are plain tensors made on the CPU, not buffers, so that building the model on the meta device
    (no weight init) leaves them real; they follow the positions' device on first use.

    LongRoPE (Phi-3) keeps two tables, short and long factors, and a request uses the long ones when its
    prompt is longer than `original_max_position_embeddings`, as transformers does for the prompt. A request
    that only outgrows it while decoding keeps the short ones (its cached K would otherwise mix the two);
    transformers' Phi-3 instead drops its cache there and encodes the whole sequence again with long factors.
    """

    def __init__(self, head_dim: int, max_position: int, params: dict) -> None:
        super().__init__()
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.original_max_position = None
        if params["rope_type"] != "longrope":
            self.cos_cache, self.sin_cache = _cos_sin(_inv_freq(rotary_dim, params), max_position)
            return
        self.original_max_position = params["original_max_position_embeddings"]
        factor = params["factor"]
        scaling = params.get("attention_factor")
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max_position))
        base = params["rope_theta"] ** _exponents(rotary_dim)
        tables = [
            _cos_sin(1.0 / (torch.tensor(params[key], dtype=torch.float32, device="cpu") * base), max_position, scaling)
            for key in ("short_factor", "long_factor")
        ]
        self.cos_cache = torch.stack([cos for cos, _ in tables])  # [2 (short, long), max_position, rotary_dim]
        self.sin_cache = torch.stack([sin for _, sin in tables])

    def kv_variant(self, prompt_len: int) -> tuple:
        """LongRoPE rotates with its long factors when the prompt is longer than the original context: the
        same tokens then have other K, so they must not share prefix-cache blocks with short-factor ones."""
        if self.original_max_position is not None and prompt_len > self.original_max_position:
            return ("longrope-long",)
        return ()

    def forward(self, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos and sin for each of the step's tokens, [T, 1, rotary_dim]: looked up once, shared by all
        layers (which cast them to their dtype if they rotate in PyTorch)."""
        positions = meta.positions
        if self.cos_cache.device != positions.device:
            self.cos_cache, self.sin_cache = self.cos_cache.to(positions.device), self.sin_cache.to(positions.device)
        index: tuple[torch.Tensor, ...] = (positions,)
        if self.original_max_position is not None:
            index = ((meta.prompt_lens > self.original_max_position).long(), positions)
        return self.cos_cache[index].unsqueeze(1), self.sin_cache[index].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D] with cos/sin [T, 1, rotary_dim] from RotaryEmbedding (rotate-half layout)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:  # partial rotary: the rest of each head passes through
        return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    half = rotary_dim // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
