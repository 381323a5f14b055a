"""Every end-of-turn id stops a request: config.json's eos_token_id list and generation_config.json's, as
transformers' generate and vLLM stop on any of them (Llama 3 Instruct's `<|eot_id|>` is only in the latter)."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.config import eos_token_ids

PROMPT = [5, 17, 42, 99, 7, 3]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def stop_ids_dir(llama_dir, tmp_path_factory):
    """The llama checkpoint with two more stop ids: one in config.json's list, one in generation_config.json,
    the latter coming first in the greedy continuation of PROMPT."""
    path = str(tmp_path_factory.mktemp("stop_ids") / "llama")
    shutil.copytree(llama_dir, path)
    llm = LLM(path)
    greedy = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                       ignore_eos=True), use_tqdm=False)
    tokens = greedy[0].outputs[0].token_ids
    fresh = [t for i, t in enumerate(tokens) if t not in tokens[:i] and t not in (0, 1, 2)]
    assert len(fresh) >= 2, tokens
    generation_id, config_id = fresh[-2], fresh[-1]  # the generation config's id ends the turn first
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["eos_token_id"] = [2, config_id]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [generation_id, 2]}, f)
    return path, tokens, generation_id, config_id


def test_stop_ids_are_the_union_of_both_files(stop_ids_dir):
    path, _, generation_id, config_id = stop_ids_dir
    from transformers import AutoConfig

    assert eos_token_ids(AutoConfig.from_pretrained(path), path) == (2, config_id, generation_id)


def test_generation_config_eos_stops_exactly_as_transformers(stop_ids_dir):
    path, tokens, generation_id, config_id = stop_ids_dir
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=MAX_TOKENS,
                              eos_token_id=[2, config_id, generation_id])[0, len(PROMPT):].tolist()
    assert expected[-1] == generation_id and len(expected) < MAX_TOKENS  # the test's premise

    llm = LLM(path, dtype="float32")
    alone = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                         use_tqdm=False)[0].outputs[0]
    assert list(alone.token_ids) == expected and alone.finish_reason == "stop"
    # batched with others, and with min_tokens past it: every stop id is banned until then
    batch = llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[:3]}],
                         SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert list(batch[0].outputs[0].token_ids) == expected
    late = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                     min_tokens=len(expected) + 1),
                        use_tqdm=False)[0].outputs[0]
    assert generation_id not in late.token_ids[:len(expected)] and 2 not in late.token_ids[:len(expected)]
    # ignore_eos runs past every one of them
    ignored = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                        ignore_eos=True), use_tqdm=False)
    assert list(ignored[0].outputs[0].token_ids) == tokens


def test_config_eos_list_stops_without_a_generation_config(stop_ids_dir, tmp_path):
    path, tokens, _, config_id = stop_ids_dir
    only_config = str(tmp_path / "llama")
    shutil.copytree(path, only_config)
    os.remove(os.path.join(only_config, "generation_config.json"))
    out = LLM(only_config, dtype="float32").generate(
        {"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    token_ids = list(out[0].outputs[0].token_ids)
    assert token_ids == tokens[:tokens.index(config_id) + 1] and out[0].outputs[0].finish_reason == "stop"
