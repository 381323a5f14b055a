"""EngineArgs: what a user sets, with vLLM's names. Imports nothing heavy, so the CLI can start the engine
process before the front end pays for torch and transformers."""

from dataclasses import dataclass, fields

SCHEDULING_POLICIES = ("fcfs", "priority", "session")


@dataclass
class EngineArgs:
    model: str | None = None  # HF checkpoint directory or .gguf file; None: the default model
    tokenizer: str | None = None
    gguf_file: str | None = None  # a GGUF file inside the `model` directory
    dtype: str = "auto"
    # None (the checkpoint's own: a GPTQ / AWQ config's method; "gguf" for a .gguf file on the CPU), "gguf" (keep a
    # GGUF file's linear weights in their block format), "int8" / "int4" (quantize a float checkpoint's linear
    # weights at load), "gptq" / "awq" (vLLM's names)
    quantization: str | None = None
    dequantize_gguf: bool = False  # load a .gguf file's weights dequantized to `dtype` instead of computing on blocks
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    num_gpu_blocks_override: int | None = None  # vLLM's name for num_kv_blocks
    enable_prefix_caching: bool = True
    seed: int = 0
    device: str = "auto"
    generation_config: str = "auto"  # sampling defaults: "auto" (the model's generation_config.json), "vllm", a dir
    structured_outputs_config: dict | None = None  # {"backend": "xgrammar" | "guidance" | "auto"}, as vLLM
    scheduling_policy: str = "fcfs"  # "fcfs", "priority" (vLLM's) or "session" (program-level, agent sessions)
    async_scheduling: bool = False  # schedule step N+1 while step N's forward runs (vLLM's --async-scheduling)
    tensor_parallel_size: int = 1  # ranks the model is split across
    distributed_executor_backend: str | None = None  # the ranks > 0 as "mp" processes (default) or "ray" actors
    # Model-free drafts, vLLM's dict: {"method": "ngram" | "suffix", "num_speculative_tokens": k, ...}
    speculative_config: dict | None = None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
