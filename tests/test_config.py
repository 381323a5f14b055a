"""EngineArgs -> EngineConfig: dtype resolution, the checkpoint's generation defaults, the quantization method."""

import json
import os

import pytest
import torch

from pagedserve import LLM
from pagedserve.config import EngineArgs, create_engine_config, resolve_dtype


class Config:  # the one attribute resolve_dtype reads
    def __init__(self, dtype):
        self.dtype = dtype


@pytest.mark.parametrize("checkpoint", [torch.float32, torch.float16, torch.bfloat16, None])
@pytest.mark.parametrize("bf16", [True, False])
def test_auto_dtype_on_the_cpu_is_bf16_where_the_cpu_has_it(monkeypatch, checkpoint, bf16):
    """As vLLM: a float32 checkpoint too runs in bf16 on a CPU with AVX512-BF16/AMX; elsewhere float32."""
    monkeypatch.setattr("pagedserve.config.cpu_supports_bf16", lambda: bf16)
    expected = torch.bfloat16 if bf16 else torch.float32
    assert resolve_dtype("auto", Config(checkpoint), torch.device("cpu")) == expected
    assert resolve_dtype("float32", Config(checkpoint), torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float64", Config(checkpoint), torch.device("cpu"))


def test_generation_config_defaults(tmp_path, llama_dir):
    assert create_engine_config(EngineArgs(llama_dir)).generation_defaults == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 7, "do_sample": True, "min_p": None}))
    config = create_engine_config(EngineArgs(llama_dir, generation_config=str(tmp_path)))
    assert config.generation_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 7}
    assert create_engine_config(EngineArgs(llama_dir, generation_config="vllm")).generation_defaults == {}
    with pytest.raises(ValueError, match="has no generation_config.json"):
        create_engine_config(EngineArgs(llama_dir, generation_config=str(tmp_path / "nowhere")))


def test_llm_applies_generation_defaults_when_given_no_params(tmp_path, llama_dir):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5}))
    llm = LLM(llama_dir, dtype="float32", max_model_len=128, num_kv_blocks=16, generation_config=str(tmp_path))
    params = llm.get_default_sampling_params()
    assert params.temperature == 0.0 and params.max_tokens == 5
    out = llm.generate("The quick", use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) <= 5 and out.finish_reason in ("length", "stop")


@pytest.mark.parametrize("name", ["fp8", "INT8", "int3", "bitsandbytes", "gptq_marlin"])
def test_unknown_quantization_names_are_refused(llama_dir, name):
    with pytest.raises(ValueError, match="quantization must be one of"):
        create_engine_config(EngineArgs(llama_dir, quantization=name))


@pytest.mark.parametrize("name", ["int8", "int4", "gptq", "awq"])
def test_checkpoint_quantizations_do_not_apply_to_a_gguf_model(name):
    with pytest.raises(ValueError, match="does not apply to a .gguf model"):
        create_engine_config(EngineArgs(None, quantization=name))  # the default model: a Q4_1 GGUF


def test_quantization_of_a_float_checkpoint(llama_dir):
    assert create_engine_config(EngineArgs(llama_dir)).quantization is None
    assert create_engine_config(EngineArgs(llama_dir, quantization="int4")).quantization == "int4"
    with pytest.raises(ValueError, match="needs a .gguf model"):
        create_engine_config(EngineArgs(llama_dir, quantization="gguf"))
    for name in ("gptq", "awq"):
        with pytest.raises(ValueError, match="quantization_config .* this one has none"):
            create_engine_config(EngineArgs(llama_dir, quantization=name))


@pytest.mark.parametrize(("quantization_config", "error"), [
    ({"quant_method": "fp8"}, "quant_method 'fp8' is not supported"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits=8 are not supported"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3 are not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 16}, "group_size 16 is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {r"+:.*\.1[0-5]\..*": {"bits": 8}}},
     "per-module overrides"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point=false"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "only GEMM"),
])
def test_unsupported_checkpoint_quantization(tmp_path, llama_dir, quantization_config, error):
    with open(os.path.join(llama_dir, "config.json")) as f:
        config = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    with pytest.raises(ValueError, match=error):
        create_engine_config(EngineArgs(str(tmp_path)))


def test_a_gguf_model_runs_quantized_by_default_on_the_cpu():
    assert create_engine_config(EngineArgs(None)).quantization == "gguf"  # the default model: a Q4_1 GGUF
    assert create_engine_config(EngineArgs(None, quantization="gguf")).quantization == "gguf"
    assert create_engine_config(EngineArgs(None, dequantize_gguf=True)).quantization is None


def test_dequantize_gguf_needs_a_gguf_model_and_no_method(llama_dir):
    with pytest.raises(ValueError, match="dequantize_gguf"):
        create_engine_config(EngineArgs(None, quantization="gguf", dequantize_gguf=True))
    with pytest.raises(ValueError, match="dequantize_gguf"):
        create_engine_config(EngineArgs(llama_dir, dequantize_gguf=True))


def test_tensor_parallel_settings(tmp_path, llama_dir):
    config = create_engine_config(EngineArgs(llama_dir, tensor_parallel_size=2))
    assert (config.tensor_parallel_size, config.distributed_executor_backend) == (2, "mp")
    assert create_engine_config(EngineArgs(llama_dir, tensor_parallel_size=2,
                                           distributed_executor_backend="ray")).distributed_executor_backend == "ray"
    for size in (0, -1):
        with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
            create_engine_config(EngineArgs(llama_dir, tensor_parallel_size=size))
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of"):
        create_engine_config(EngineArgs(llama_dir, tensor_parallel_size=2, distributed_executor_backend="uni"))
    assert create_engine_config(EngineArgs(llama_dir, tensor_parallel_size=4)).tensor_parallel_size == 4  # 2 kv heads
    with open(os.path.join(llama_dir, "config.json")) as f:
        config = json.load(f)
    heads = {"hidden_size": 96, "num_attention_heads": 12, "num_key_value_heads": 3}
    (tmp_path / "config.json").write_text(json.dumps({**config, **heads}))
    with pytest.raises(ValueError, match=r"num_key_value_heads=3 is not divisible by tensor_parallel_size=4 \(nor"):
        create_engine_config(EngineArgs(str(tmp_path), tensor_parallel_size=4))


def test_tensor_parallel_dequantizes_gguf_and_refuses_4_bit_checkpoints(tmp_path, llama_dir):
    """GGUF blocks and GPTQ / AWQ groups run along the input features, which row-parallel layers cut."""
    assert create_engine_config(EngineArgs(None, tensor_parallel_size=3)).quantization is None  # 9 heads, 3 kv
    with pytest.raises(ValueError, match="'gguf' does not run with tensor_parallel_size > 1"):
        create_engine_config(EngineArgs(None, quantization="gguf", tensor_parallel_size=3))
    assert create_engine_config(EngineArgs(llama_dir, quantization="int8", tensor_parallel_size=2)).quantization \
        == "int8"
    with open(os.path.join(llama_dir, "config.json")) as f:
        config = json.load(f)
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": gptq}))
    with pytest.raises(ValueError, match="'gptq' does not run with tensor_parallel_size > 1"):
        create_engine_config(EngineArgs(str(tmp_path), tensor_parallel_size=2))
