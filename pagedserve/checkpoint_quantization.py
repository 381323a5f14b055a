"""The quantization methods by vLLM's names, and a checkpoint's own quantization (`quantization_config` in
config.json: GPTQ, AWQ), read and checked without torch, so that the engine config (and the front end that
imports it) stays light. The methods themselves live in `model_executor/layers/quantization/`: the registry there
imports the config class each name gives, when it is used; the GPTQ / AWQ tensors are converted in its
`gptq_awq.py`."""

from collections.abc import Mapping
from dataclasses import dataclass

from transformers import PretrainedConfig

METHODS = ("gptq", "awq")  # a checkpoint's own 4-bit weights, in the formats parse_config reads

# The one list of quantization methods: name -> its QuantizationConfig, "module:class" in
# pagedserve.model_executor.layers.quantization (a name, so that this module imports none of it).
QUANTIZATION_METHODS: dict[str, str] = {
    "gguf": "gguf:GGUFConfig",  # compute on a GGUF file's blocks
    "int8": "int_linear:IntConfig",  # quantize a float checkpoint at load
    "int4": "int_linear:IntConfig",
    **dict.fromkeys(METHODS, "gptq_awq:CheckpointInt4Config"),
}


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a GPTQ / AWQ `quantization_config` says about how to read the tensors."""

    method: str  # "gptq" or "awq"
    group_size: int | None  # weights per group along K; None: one group per output row (-1 in the config)
    symmetric: bool  # every zero is 8 (GPTQ sym=True)
    act_order: bool  # GPTQ desc_act with groups: projections are dequantized to float at load
    zero_offset: int  # added to a stored zero: 1 for GPTQ v1 checkpoints

    def group_of(self, in_features: int) -> int:
        return self.group_size or in_features


def checkpoint_method(hf_config: PretrainedConfig) -> str | None:
    """The `quant_method` of the checkpoint's `quantization_config` (lower case), None without one."""
    config = quantization_config(hf_config)
    return None if config is None else str(config.get("quant_method", "")).lower()


def quantization_config(hf_config: PretrainedConfig) -> Mapping | None:
    config = getattr(hf_config, "quantization_config", None)
    if config is None or isinstance(config, Mapping):
        return config
    return config.to_dict()  # a transformers QuantizationConfigMixin


def parse_config(config: Mapping) -> CheckpointQuantization:
    """A GPTQ / AWQ `quantization_config` -> CheckpointQuantization; a ValueError for what cannot run here."""
    method = str(config.get("quant_method", "")).lower()
    if method not in METHODS:
        raise ValueError(f"quantization_config quant_method {method!r} is not supported (supported: {METHODS})")
    bits = config.get("bits", config.get("w_bit"))
    if bits != 4:
        raise ValueError(f"{method.upper()} checkpoints with bits={bits} are not supported (only 4-bit)")
    group_size = config.get("group_size", config.get("q_group_size", 128))
    if group_size != -1 and (not isinstance(group_size, int) or group_size <= 0 or group_size % 32):
        raise ValueError(f"{method.upper()} group_size {group_size} is not supported (a multiple of 32, or -1)")
    groups = None if group_size == -1 else group_size
    if method == "awq":
        if config.get("version", "gemm").lower() != "gemm":
            raise ValueError(f"AWQ version {config.get('version')!r} is not supported (only GEMM)")
        if not config.get("zero_point", True):
            raise ValueError("AWQ checkpoints without zero points (zero_point=false) are not supported")
        return CheckpointQuantization("awq", groups, symmetric=False, act_order=False, zero_offset=0)
    overridden = [pattern for pattern, override in (config.get("dynamic") or {}).items()
                  if override and not pattern.startswith("-:")]  # "-:" only leaves modules float: read as such
    if overridden:
        raise ValueError(f"GPTQ per-module overrides (dynamic: {overridden[:2]}) are not supported")
    checkpoint_format = config.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported (gptq, gptq_v2)")
    return CheckpointQuantization(
        "gptq", groups, symmetric=bool(config.get("sym", True)),
        act_order=bool(config.get("desc_act", False)) and groups is not None,
        zero_offset=1 if checkpoint_format == "gptq" else 0,
    )
