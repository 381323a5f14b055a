"""EngineArgs -> EngineConfig: dtype resolution and the checkpoint's generation defaults."""

import json

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
