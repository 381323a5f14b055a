"""GPT-2 specifics the shared transformers comparison does not reach: old checkpoint layouts, position limit."""

import os

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file, save_file

from pagedserve import LLM, SamplingParams

PROMPTS = [[5, 6, 7], list(range(10, 90)), [300] * 40]


def greedy(path: str) -> list[list[int]]:
    llm = LLM(path, dtype="float32", max_model_len=256, num_kv_blocks=64)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]


def test_checkpoint_without_prefix_and_with_mask_buffers(tmp_path):
    """Older GPT-2 files name tensors without `transformer.` and store each layer's causal mask."""
    path = make_checkpoint(os.path.join(tmp_path, "gpt2"), "gpt2")
    expected = greedy(path)
    weights_file = os.path.join(path, "model.safetensors")
    weights = load_file(weights_file)
    old = {name.removeprefix("transformer."): tensor for name, tensor in weights.items()}
    for i in range(2):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1024, 1024, dtype=torch.uint8)).view(1, 1, 1024, 1024)
    save_file(old, weights_file, metadata={"format": "pt"})
    assert greedy(path) == expected


def test_max_model_len_beyond_learned_positions_is_a_value_error(tmp_path):
    path = make_checkpoint(os.path.join(tmp_path, "gpt2"), "gpt2")
    with pytest.raises(ValueError, match="learned positions"):
        LLM(path, dtype="float32", max_model_len=2048, num_kv_blocks=16)
