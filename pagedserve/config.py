"""The resolved EngineConfig the engine runs with, made from EngineArgs (what a user sets, vLLM's names)."""

import json
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, PretrainedConfig

from pagedserve import checkpoint_quantization
from pagedserve.distributed.parallel_state import check_kv_heads
from pagedserve.engine_args import SCHEDULING_POLICIES, EngineArgs
from pagedserve.gguf_file import load_gguf_config
from pagedserve.model_files import DEFAULT_MODEL_FILE, resolve_model
from pagedserve.speculative_config import SpeculativeConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model_path: str  # directory or GGUF file the weights come from
    gguf_path: str | None
    hf_config: PretrainedConfig
    tokenizer_path: str | None
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_memory_bytes: int | None
    num_kv_blocks: int | None
    enable_prefix_caching: bool
    seed: int
    # Default sampling settings from the checkpoint's generation_config.json, by SamplingParams name.
    generation_defaults: dict[str, float | int]
    structured_outputs_backend: str  # "xgrammar", "guidance" or "auto"
    scheduling_policy: str
    async_scheduling: bool  # overlap scheduling with the forward (see engine_core.py)
    # "gguf": linear weights stay in their GGUF blocks; "int8" / "int4": quantized at load; "gptq" / "awq": the
    # checkpoint's 4-bit weights (see loader.py and layers/quantization/)
    quantization: str | None = None
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"  # "mp" or "ray": how ranks > 0 run (executor/tensor_parallel.py)
    # Every id that ends a turn: the union of config.json's and generation_config.json's eos_token_id, the
    # config's first id first (as vLLM and transformers' generate stop on any of them).
    eos_token_ids: tuple[int, ...] = ()
    speculative_config: SpeculativeConfig | None = None  # drafts verified in one step (engine/spec_decode/)


def cpu_supports_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype}")
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        return _DTYPES[dtype]
    checkpoint_dtype = getattr(hf_config, "dtype", None) or torch.float32
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = _DTYPES.get(checkpoint_dtype, torch.float32)
    if device.type == "cpu":
        # As vLLM: bf16 wherever the CPU computes it fast (AVX512-BF16/AMX), whatever the checkpoint's dtype
        # (a float32 checkpoint too); fp16 has no fast CPU path at all.
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    if checkpoint_dtype == torch.float32:  # as vLLM on GPUs: half precision
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return checkpoint_dtype


def create_engine_config(args: EngineArgs) -> EngineConfig:
    model_path, gguf_path = resolve_model(args.model, args.gguf_file)
    if gguf_path:
        hf_config = load_gguf_config(gguf_path)
    else:
        hf_config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {args.device!r}") from e
    dtype = resolve_dtype(args.dtype, hf_config, device)

    derived_max_len = getattr(hf_config, "max_position_embeddings", None) or 2048
    max_model_len = args.max_model_len or derived_max_len
    if max_model_len <= 0:
        raise ValueError(f"max_model_len must be positive, got {max_model_len}")
    if args.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
        raise ValueError(f"block_size must be a power of two from 1 to 128, got {args.block_size}")
    if args.max_num_seqs <= 0:
        raise ValueError(f"max_num_seqs must be positive, got {args.max_num_seqs}")
    max_num_batched_tokens = args.max_num_batched_tokens or 2048
    if max_num_batched_tokens <= 0:
        raise ValueError(f"max_num_batched_tokens must be positive, got {max_num_batched_tokens}")
    if args.scheduling_policy not in SCHEDULING_POLICIES:
        raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {args.scheduling_policy!r}")
    tp, executor_backend = resolve_tensor_parallel(args.tensor_parallel_size, args.distributed_executor_backend,
                                                   device, hf_config)
    quantization = resolve_quantization(args.quantization, hf_config, gguf_path, device, args.dequantize_gguf, tp)
    num_kv_blocks = args.num_kv_blocks or args.num_gpu_blocks_override
    if num_kv_blocks is not None and num_kv_blocks <= 0:
        raise ValueError(f"num_kv_blocks must be positive, got {num_kv_blocks}")
    return EngineConfig(
        model_path=model_path,
        gguf_path=gguf_path,
        hf_config=hf_config,
        tokenizer_path=args.tokenizer,
        dtype=dtype,
        device=device,
        max_model_len=max_model_len,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        num_kv_blocks=num_kv_blocks,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        generation_defaults=generation_defaults(args.generation_config, model_path, gguf_path),
        structured_outputs_backend=structured_outputs_backend(args.structured_outputs_config),
        scheduling_policy=args.scheduling_policy,
        async_scheduling=args.async_scheduling,
        quantization=quantization,
        tensor_parallel_size=tp,
        distributed_executor_backend=executor_backend,
        eos_token_ids=eos_token_ids(hf_config, None if gguf_path else model_path),
        speculative_config=SpeculativeConfig.from_dict(args.speculative_config),
    )


EXECUTOR_BACKENDS = ("mp", "ray")  # vLLM's distributed_executor_backend values that run here


def resolve_tensor_parallel(size: int, backend: str | None, device: torch.device,
                            hf_config: PretrainedConfig) -> tuple[int, str]:
    """(ranks, how ranks > 0 run). Heads and experts must split evenly across the ranks, key/value heads may also
    be fewer (each is then held by several ranks); every other size is checked as the layers are built."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    for name in ("num_attention_heads", "num_local_experts", "num_experts"):
        value = getattr(hf_config, name, None)
        if value and value % size:
            raise ValueError(f"{name}={value} is not divisible by tensor_parallel_size={size}")
    if getattr(hf_config, "num_key_value_heads", None):
        check_kv_heads(hf_config.num_key_value_heads, size)
    if backend not in (None, *EXECUTOR_BACKENDS):
        raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, got {backend!r}")
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs; {torch.cuda.device_count()} are visible")
    if device.type == "cuda" and device.index not in (None, 0) and size > 1:
        raise ValueError("with tensor_parallel_size > 1, rank r runs on cuda:r: give device 'cuda'")
    return size, backend or "mp"


QUANTIZATION_METHODS = (None, *checkpoint_quantization.QUANTIZATION_METHODS)  # vLLM's names


def resolve_quantization(requested: str | None, hf_config: PretrainedConfig, gguf_path: str | None,
                         device: torch.device, dequantize_gguf: bool = False,
                         tensor_parallel_size: int = 1) -> str | None:
    """The quantization the weights run with: what the user asked for, or, as vLLM, the checkpoint's own
    (`quantization_config` in config.json) when they asked for none; a ValueError for what does not fit.

    A .gguf file runs on its blocks by default on the CPU, where the native kernels are; on a GPU the blocks would
    be dequantized on every call (the torch path), so there it is dequantized once at load unless asked for. Split
    across ranks, a .gguf file is dequantized too, and 4-bit checkpoints are refused: their blocks and groups run
    along the input features, which row-parallel layers cut."""
    if tensor_parallel_size > 1:
        if requested == "gguf" or requested in checkpoint_quantization.METHODS or (
                requested is None and checkpoint_quantization.checkpoint_method(hf_config) is not None):
            method = requested or checkpoint_quantization.checkpoint_method(hf_config)
            raise ValueError(f"quantization {method!r} does not run with tensor_parallel_size > 1 (int8 and int4 "
                             f"quantized at load do)")
        if gguf_path:
            return None
    if requested not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {requested!r}")
    if dequantize_gguf and (not gguf_path or requested is not None):
        raise ValueError("dequantize_gguf applies to a .gguf model with no quantization method given")
    if gguf_path:
        if requested not in (None, "gguf"):
            raise ValueError(f"quantization={requested!r} does not apply to a .gguf model (use 'gguf' or None)")
        if requested is None and not dequantize_gguf and device.type == "cpu":
            return "gguf"
        return requested
    if requested == "gguf":
        raise ValueError("quantization='gguf' needs a .gguf model")
    checkpoint = checkpoint_quantization.checkpoint_method(hf_config)
    if checkpoint is None:
        if requested in checkpoint_quantization.METHODS:
            raise ValueError(f"quantization={requested!r} needs a checkpoint whose config.json has a "
                             f"quantization_config with quant_method {requested!r}; this one has none")
        return requested
    if requested is not None and requested != checkpoint:
        raise ValueError(f"the checkpoint is quantized with {checkpoint!r} (config.json quantization_config); "
                         f"quantization={requested!r} does not apply to it")
    config = checkpoint_quantization.quantization_config(hf_config)
    # unsupported methods, bits, group sizes: a ValueError now, not at load
    checkpoint_quantization.parse_config(config or {})
    return checkpoint


STRUCTURED_OUTPUTS_BACKENDS = ("xgrammar", "guidance", "auto")


def structured_outputs_backend(config: dict | None) -> str:
    config = dict(config or {})
    backend = config.pop("backend", "auto")
    if config:
        raise ValueError(f"structured_outputs_config has unknown keys {sorted(config)}; it takes only 'backend'")
    if backend not in STRUCTURED_OUTPUTS_BACKENDS:
        raise ValueError(f"structured_outputs_config backend must be one of {STRUCTURED_OUTPUTS_BACKENDS}, "
                         f"got {backend!r}")
    return backend


# generation_config.json key -> SamplingParams field: what vLLM takes from it as request defaults.
_GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                      "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def eos_token_ids(hf_config: PretrainedConfig, model_dir: str | None) -> tuple[int, ...]:
    """The ids that end a turn: config.json's eos_token_id (an id or a list) and then generation_config.json's,
    which is where Llama 3 Instruct (`<|eot_id|>`), Gemma and Phi-3 list their end-of-turn ids."""
    ids: list[int] = []
    sources = [getattr(hf_config, "eos_token_id", None)]
    path = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if path is not None and os.path.isfile(path):
        try:
            with open(path) as f:
                sources.append(json.load(f).get("eos_token_id"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    for source in sources:
        for token_id in source if isinstance(source, list) else [source]:
            if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


# A GGUF file carries no generation config. The bundled default model's (SmolLM2-135M-Instruct: its authors
# recommend temperature 0.2, top_p 0.9; at 1.0 it rambles) ships in this package instead.
DEFAULT_MODEL_GENERATION_DIR = os.path.join(os.path.dirname(__file__), "default_model")


def generation_defaults(source: str, model_path: str, gguf_path: str | None) -> dict[str, float | int]:
    """The checkpoint's recommended sampling settings (as vLLM's `--generation-config`): "auto" reads the model
    directory's generation_config.json (for the default model's GGUF file, the one shipped with pagedserve), "vllm"
    uses none, anything else is a directory holding one."""
    if source == "vllm":
        return {}
    directory = source if source != "auto" else _model_generation_dir(model_path, gguf_path)
    path = os.path.join(directory, "generation_config.json") if directory else None
    if path is None or not os.path.isfile(path):
        if source != "auto":
            raise ValueError(f"generation_config {source!r} has no generation_config.json")
        return {}
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return {name: values[key] for key, name in _GENERATION_FIELDS.items() if values.get(key) is not None}


def _model_generation_dir(model_path: str, gguf_path: str | None) -> str | None:
    if gguf_path is None:
        return model_path
    return DEFAULT_MODEL_GENERATION_DIR if os.path.basename(gguf_path) == DEFAULT_MODEL_FILE else None
