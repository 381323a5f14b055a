"""Speculative decoding as a vLLM user meets it: `LLM(speculative_config=...)`, `--speculative-config`, the same
outputs as without (stop strings too), vLLM's spec_decode metrics and the acceptance rate in the log line, and
clear errors for a bad config."""

import argparse
import asyncio
import logging

import pytest
from prometheus_client import generate_latest

from pagedserve import LLM, SamplingParams
from pagedserve.engine.protocol import EngineCoreOutput, EngineStats
from pagedserve.entrypoints.cli import add_engine_args, engine_args_from
from pagedserve.frontend.metrics import LoggingStatLogger, PrometheusMetrics
from pagedserve.frontend.output_processor import OutputProcessor
from pagedserve.speculative_config import SpeculativeConfig

# Prompts that repeat themselves: prompt lookup finds drafts in them.
PROMPTS = ["one two three four five six seven one two three four five six seven one two three",
           "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick"]


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_llm_with_a_speculative_config_gives_the_same_outputs(llama_dir, method):
    plain = LLM(llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64)
    drafted = LLM(llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64,
                  speculative_config={"method": method, "num_speculative_tokens": 4, "prompt_lookup_min": 1}
                  if method == "ngram" else {"method": method})
    free = plain.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    stop = free[0].outputs[0].text[-12:-8]  # a stop string that ends the first output midway
    params = SamplingParams(temperature=0, max_tokens=24, stop=[stop])
    ours, theirs = drafted.generate(PROMPTS, params, use_tqdm=False), plain.generate(PROMPTS, params, use_tqdm=False)
    assert theirs[0].outputs[0].stop_reason == stop
    for a, b in zip(ours, theirs):
        assert a.outputs[0].text == b.outputs[0].text and a.outputs[0].token_ids == b.outputs[0].token_ids
        assert (a.outputs[0].finish_reason, a.outputs[0].stop_reason) == (b.outputs[0].finish_reason,
                                                                          b.outputs[0].stop_reason)
    assert drafted.stats().spec_num_drafts > 0


def test_cli_takes_speculative_config_as_json():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    ns = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    ns.model = None
    assert engine_args_from(ns).speculative_config == {"method": "ngram", "num_speculative_tokens": 3}


@pytest.mark.parametrize("config, message", [
    ({"method": "eagle", "num_speculative_tokens": 3}, "method must be one of"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "at most"),
    ({"method": "suffix", "suffix_decoding_min_token_prob": 2}, "in [0.0, 1.0]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_model": "x"}, "unknown keys"),
])
def test_a_bad_config_is_a_value_error(llama_dir, config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        LLM(llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64, speculative_config=config)


def test_vllms_defaults():
    ngram = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4})
    assert ngram is not None and (ngram.prompt_lookup_min, ngram.prompt_lookup_max) == (5, 5)
    only_max = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    assert only_max is not None and only_max.prompt_lookup_min == 3
    suffix = SpeculativeConfig.from_dict({"method": "suffix"})
    assert suffix is not None and suffix.num_speculative_tokens == suffix.suffix_decoding_max_tree_depth == 24


def test_spec_decode_metrics_and_log_line(caplog):
    metrics = PrometheusMetrics("m")
    metrics.record_stats(EngineStats(spec_num_drafts=2, spec_num_draft_tokens=8, spec_num_accepted_tokens=5,
                                     spec_accepted_per_position=[2, 2, 1, 0]))
    stats = EngineStats(num_requests_running=1, spec_num_drafts=4, spec_num_draft_tokens=16,
                        spec_num_accepted_tokens=6, spec_accepted_per_position=[3, 2, 1, 0])
    metrics.record_stats(stats)
    text = generate_latest(metrics.registry).decode()
    assert 'vllm:spec_decode_num_drafts_total{model_name="m"} 4.0' in text
    assert 'vllm:spec_decode_num_draft_tokens_total{model_name="m"} 16.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 6.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"} 3.0' in text

    stat_logger = LoggingStatLogger(interval=0.0)
    stat_logger._logged_stats = EngineStats(spec_num_drafts=2, spec_num_draft_tokens=8, spec_num_accepted_tokens=5)
    with caplog.at_level(logging.INFO, logger="pagedserve"):
        stat_logger.record(stats, 0, 10)
    # this interval: 1 of 8 drafted tokens accepted over 2 drafts
    assert "Draft acceptance rate: 12.5%, Mean acceptance length: 1.50" in caplog.text


def test_a_stop_string_inside_a_steps_tokens_ends_the_output_at_its_token(hf_tokenizer):
    """An accepted draft brings several tokens in one output: the output ends at the token that completes the stop
    string, with its logprobs, as when the tokens came one step at a time."""
    token_ids = hf_tokenizer.encode(" one two three four five six", add_special_tokens=False)
    entries = [{t: (-0.5, 1)} for t in token_ids]

    def final(chunks: list[int]):
        processor = OutputProcessor(hf_tokenizer)
        state = processor.add_request("r", None, [1, 2], SamplingParams(max_tokens=50, stop=["three"], logprobs=0))
        start, result = 0, None
        for size in chunks:
            result = processor.process([EngineCoreOutput("r", token_ids[start : start + size],
                                                         entries[start : start + size])])
            start += size
            if result.to_abort:
                break
        return state.samples[0], result

    one_by_one, first = final([1] * len(token_ids))
    at_once, second = final([2, len(token_ids) - 2])
    assert first is not None and second is not None and first.to_abort == second.to_abort == [("r", 0)]
    assert at_once.token_ids == one_by_one.token_ids and len(at_once.token_ids) < len(token_ids)
    assert at_once.detokenizer.text == one_by_one.detokenizer.text == " one two "
    assert at_once.logprobs is not None and len(at_once.logprobs) == len(at_once.token_ids)


def test_streamed_deltas_of_drafted_steps_add_up_to_the_output(llama_dir):
    """A step that accepts a draft streams its tokens as one delta; the deltas add up to the output without drafts
    (served streaming, tool-call parsing and stop strings all read these deltas)."""
    from pagedserve import EngineArgs
    from pagedserve.frontend.async_llm import AsyncLLM
    from pagedserve.sampling_params import RequestOutputKind

    prompt = PROMPTS[0]
    expected = LLM(llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64).generate(
        prompt, SamplingParams(max_tokens=32, temperature=0), use_tqdm=False)[0].outputs[0]
    # suffix: the first request's output goes into the cache of past outputs, and drafts the second one's
    args = EngineArgs(model=llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64,
                      speculative_config={"method": "suffix"})

    async def stream() -> list:
        engine = AsyncLLM(args)
        try:
            params = SamplingParams(max_tokens=32, temperature=0, output_kind=RequestOutputKind.DELTA)
            [out async for out in engine.generate(prompt, params, "first")]
            return [out async for out in engine.generate(prompt, params, "s")]
        finally:
            await engine.shutdown()

    deltas = asyncio.run(stream())
    assert "".join(o.outputs[0].text for o in deltas) == expected.text
    assert sum((o.outputs[0].token_ids for o in deltas), []) == expected.token_ids
    assert len(deltas) < len(expected.token_ids)  # some deltas carried several tokens
