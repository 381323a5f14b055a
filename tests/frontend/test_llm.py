"""The offline API as a vLLM user drives it."""

import pytest

from pagedserve import LLM, CompletionOutput, EngineArgs, RequestOutput, SamplingParams
from pagedserve.config import create_engine_config


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=128)


def assert_no_leaks(llm: LLM) -> None:
    stats = llm.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    assert stats.num_requests_running == stats.num_requests_waiting == 0


def test_outputs_in_input_order_with_fields(llm):
    prompts = ["The quick brown fox", {"prompt_token_ids": [5, 6, 7]}, "Paged attention"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == ["The quick brown fox", None, "Paged attention"]
    assert outs[1].prompt_token_ids == [5, 6, 7]
    assert outs[0].prompt_token_ids == llm.get_tokenizer().encode("The quick brown fox")
    for out in outs:
        assert isinstance(out, RequestOutput) and out.finished
        (c,) = out.outputs
        assert isinstance(c, CompletionOutput) and c.index == 0
        assert len(c.token_ids) == 5 and c.finish_reason == "length" and c.stop_reason is None
        assert c.text == llm.get_tokenizer().decode(c.token_ids, skip_special_tokens=True)
    assert len({o.request_id for o in outs}) == 3
    assert_no_leaks(llm)


def test_one_params_per_prompt(llm):
    params = [SamplingParams(max_tokens=2, ignore_eos=True), SamplingParams(max_tokens=4, ignore_eos=True)]
    outs = llm.generate(["a", "b"], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 4]
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(["a", "b"], params[:1], use_tqdm=False)


def test_seed_reproduces_and_is_batch_independent(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate("Continuous batching", params, use_tqdm=False)[0].outputs[0].token_ids
    noise = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    batch = llm.generate(["x y z", "Continuous batching", "fox"], [noise, params, noise], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other = llm.generate("Continuous batching", SamplingParams(max_tokens=12, temperature=1.0, seed=99,
                                                               ignore_eos=True), use_tqdm=False)
    assert other[0].outputs[0].token_ids != alone


def test_stop_token_ids(llm):
    greedy = llm.generate("The quick", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    stop_id = greedy[3]
    first = greedy.index(stop_id)
    out = llm.generate("The quick", SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert_no_leaks(llm)


def test_stop_strings_end_and_are_excluded(llm):
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full = llm.generate("Paged", params, use_tqdm=False)[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:6]  # likely spans a token boundary
    out = llm.generate("Paged", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]
    assert stop not in out.text
    assert len(out.token_ids) < 20 and tok.decode(out.token_ids).startswith(out.text)
    kept = llm.generate("Paged", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop],
                                                include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]
    assert_no_leaks(llm)


def test_eos_stops_with_stop_reason_none(llm):
    # Force EOS: the only token allowed by a huge logit bias.
    eos = llm.get_tokenizer().eos_token_id
    out = llm.generate("hi", SamplingParams(max_tokens=5, temperature=0, logit_bias={eos: 100.0}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == ""
    delayed = llm.generate("hi", SamplingParams(max_tokens=5, temperature=0, min_tokens=3,
                                                logit_bias={eos: 100.0}), use_tqdm=False)[0].outputs[0]
    assert len(delayed.token_ids) == 4 and delayed.token_ids[-1] == eos and eos not in delayed.token_ids[:3]


def test_n_samples(llm):
    out = llm.generate("The quick", SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=7, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_no_leaks(llm)


def test_logprobs_top_k(llm):
    out = llm.generate("The", SamplingParams(max_tokens=3, temperature=0, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 3
    for token_id, entry in zip(out.token_ids, out.logprobs):
        assert token_id in entry and entry[token_id].rank == 1  # greedy takes the most likely
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks == [1, 2, 3]
        values = sorted(entry.values(), key=lambda lp: lp.rank)
        assert all(a.logprob >= b.logprob for a, b in zip(values, values[1:]))
        assert all(isinstance(lp.decoded_token, str) for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "hello"}]
    out = llm.chat(messages, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    expected = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.prompt == expected and expected.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == llm.get_tokenizer().encode(expected, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) == 3


def test_bad_inputs_raise_and_leak_nothing(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 300}, use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate({"prompt_token_ids": [5, 10**6]}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("a", SamplingParams(temperature=-1.0), use_tqdm=False)
    # a bad prompt after good ones: nothing of the batch is left behind
    with pytest.raises(ValueError):
        llm.generate(["fine", {"prompt_token_ids": [5] * 300}], use_tqdm=False)
    assert_no_leaks(llm)


def test_generation_capped_by_max_model_len(llm):
    out = llm.generate({"prompt_token_ids": [5] * 250}, SamplingParams(max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_unknown_architecture_and_missing_model(tmp_path, llama_dir):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(bad), dtype="float32")
    with pytest.raises(ValueError, match="local path"):
        LLM("some-org/some-model")
    with pytest.raises(ValueError, match="unknown LLM arguments"):
        LLM(llama_dir, not_an_arg=1)
    with pytest.raises(ValueError, match="dtype"):
        LLM(llama_dir, dtype="float8")


def test_float16_and_bfloat16_run(llama_dir):
    for dtype in ("float16", "bfloat16"):
        llm = LLM(llama_dir, dtype=dtype, max_model_len=128, num_kv_blocks=16)
        out = llm.generate("The quick", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 4
        assert_no_leaks(llm)


def test_gguf_file_inside_a_directory():
    """vLLM's spelling for GGUF: the directory as `model`, the file as `gguf_file`."""
    import os

    from pagedserve.model_files import default_model_path

    directory, name = os.path.split(default_model_path())
    llm = LLM(directory, gguf_file=name, dtype="float32", max_model_len=64, num_kv_blocks=8)
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    defaults = llm.get_default_sampling_params()  # the default model's generation config, shipped with pagedserve
    assert (defaults.temperature, defaults.top_p) == (0.2, 0.9)
    no_defaults = EngineArgs(directory, gguf_file=name, generation_config="vllm")
    assert create_engine_config(no_defaults).generation_defaults == {}


def test_cache_salt_separates_prefix_cache(llm):
    prompt = list(range(5, 5 + 40))
    params = SamplingParams(max_tokens=1, temperature=0)
    before = llm.stats().prefix_cache_hits
    llm.generate({"prompt_token_ids": prompt, "cache_salt": "tenant-a"}, params, use_tqdm=False)
    llm.generate({"prompt_token_ids": prompt, "cache_salt": "tenant-b"}, params, use_tqdm=False)
    assert llm.stats().prefix_cache_hits == before  # other salt: no hit
    llm.generate({"prompt_token_ids": prompt, "cache_salt": "tenant-a"}, params, use_tqdm=False)
    assert llm.stats().prefix_cache_hits == before + 32  # same salt: both full blocks
    assert_no_leaks(llm)
