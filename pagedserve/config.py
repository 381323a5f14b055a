"""The resolved EngineConfig the engine runs with, made from EngineArgs (what a user sets, vLLM's names)."""

import logging
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, PretrainedConfig

from pagedserve.engine_args import EngineArgs
from pagedserve.model_executor import gguf_loader

logger = logging.getLogger("pagedserve")

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
    if device.type == "cpu" and checkpoint_dtype in (torch.bfloat16, torch.float16):
        # CPU matmuls are fast in bf16 only with AVX512-BF16/AMX; fp16 has no fast CPU path at all.
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return checkpoint_dtype


def resolve_model(args: EngineArgs) -> tuple[str, str | None]:
    """The weights' location and, for GGUF, the file. Only local paths: nothing is downloaded."""
    model = args.model or gguf_loader.default_model_path()
    if args.gguf_file:
        model = os.path.join(model, args.gguf_file)
    if not os.path.exists(model):
        raise ValueError(
            f"model {model!r} is not a local path: give a Hugging Face checkpoint directory or a .gguf file "
            "(pagedserve never downloads weights)"
        )
    if os.path.isfile(model):
        if not gguf_loader.is_gguf_file(model):
            raise ValueError(f"{model!r} is a file but not a GGUF checkpoint")
        return model, model
    if not os.path.exists(os.path.join(model, "config.json")):
        raise ValueError(f"{model!r} has no config.json: not a Hugging Face checkpoint directory")
    return model, None


def create_engine_config(args: EngineArgs) -> EngineConfig:
    model_path, gguf_path = resolve_model(args)
    if gguf_path:
        hf_config = gguf_loader.load_gguf_config(gguf_path)
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
    )
