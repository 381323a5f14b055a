import dataclasses

import pytest

from pagedserve.sampling_params import RequestOutputKind, SamplingParams, SamplingType, StructuredOutputsParams

# vLLM's documented SamplingParams defaults (the fields this engine supports).
VLLM_DEFAULTS = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": [],
    "stop_token_ids": [],
    "ignore_eos": False,
    "max_tokens": 16,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
    "logit_bias": None,
    "structured_outputs": None,
    "output_kind": RequestOutputKind.CUMULATIVE,
}


def test_defaults_match_vllm() -> None:
    params = SamplingParams()
    assert dataclasses.asdict(params) == VLLM_DEFAULTS
    assert params.sampling_type == SamplingType.RANDOM
    assert not params.is_greedy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"n": True}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"frequency_penalty": "x"}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": None}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": "5"}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop": ["ok", 5]}, "stop"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
        ({"stop_token_ids": 7}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"skip_special_tokens": 1}, "skip_special_tokens"),
        ({"spaces_between_special_tokens": None}, "spaces_between_special_tokens"),
        ({"include_stop_str_in_output": 0}, "include_stop_str_in_output"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 3.0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": 2.0}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"logit_bias": {-3: 1.0}}, "logit_bias"),
        ({"logit_bias": {3: "big"}}, "logit_bias"),
        ({"logit_bias": {3: float("-inf")}}, "logit_bias"),
        ({"n": 2, "temperature": 0.0}, "n"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"top_p": 1e-9, "top_k": 1, "min_p": 1.0},
        {"repetition_penalty": 5.0},
        {"max_tokens": None, "min_tokens": 1000},
        {"min_tokens": 4, "max_tokens": 4},
        {"logprobs": 0, "prompt_logprobs": 20},
        {"seed": 0},
        {"seed": -(2**63)},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(params, name) == value


def test_normalisation() -> None:
    params = SamplingParams(
        stop="###",
        stop_token_ids=(3, 4),
        top_k=-1,
        seed=-1,
        logprobs=True,
        temperature=2,
        logit_bias={"7": -1, 9: 2.5},
    )
    assert params.stop == ["###"]
    assert params.stop_token_ids == [3, 4]
    assert params.top_k == 0
    assert params.seed is None
    assert params.logprobs == 1
    assert isinstance(params.temperature, float) and params.temperature == 2.0
    assert params.logit_bias == {7: -1.0, 9: 2.5}
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


@pytest.mark.parametrize("temperature", [0.0, 5e-6])
def test_greedy_switches_truncation_off(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=0.5, top_k=5, min_p=0.3, seed=3)
    assert params.is_greedy
    assert params.sampling_type == SamplingType.GREEDY
    assert (params.top_p, params.top_k, params.min_p) == (1.0, 0, 0.0)


def test_random_keeps_truncation_and_tiny_temperature_is_raised() -> None:
    params = SamplingParams(temperature=1e-3, top_p=0.5, top_k=5, min_p=0.3)
    assert not params.is_greedy
    assert params.temperature == pytest.approx(0.01)
    assert (params.top_p, params.top_k, params.min_p) == (0.5, 5, 0.3)
    assert SamplingParams(seed=7).sampling_type == SamplingType.RANDOM_SEED


def test_output_text_buffer_length() -> None:
    assert SamplingParams(stop=["a", "abcd"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["abcd"], include_stop_str_in_output=True).output_text_buffer_length == 0
    assert SamplingParams().output_text_buffer_length == 0


def test_clone_is_deep() -> None:
    params = SamplingParams(stop=["x"], stop_token_ids=[1], logit_bias={1: 1.0}, temperature=0.7)
    clone = params.clone()
    assert clone == params and clone is not params
    clone.stop.append("y")
    clone.stop_token_ids.append(2)
    clone.logit_bias[5] = 3.0
    assert params.stop == ["x"]
    assert params.stop_token_ids == [1]
    assert params.logit_bias == {1: 1.0}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_k": 2**31}, "top_k"),
        ({"max_tokens": 2**63}, "max_tokens"),
        ({"min_tokens": 2**64}, "min_tokens"),
        ({"n": 2**64}, "n"),
        ({"seed": 2**64}, "seed"),
        ({"stop_token_ids": [2**63]}, "stop_token_ids"),
        ({"logit_bias": {2**63: 1.0}}, "logit_bias"),
        ({"logit_bias": {str(2**64): 1.0}}, "logit_bias"),
        ({"stop": ["a\ud800"]}, "stop"),
    ],
)
def test_integers_fit_int64_and_text_is_valid_unicode(kwargs, field) -> None:
    """Whatever passes here fits the tensors and msgpack messages it travels in (2**64 - 1 for seeds)."""
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
    assert SamplingParams(seed=2**64 - 1, top_k=2**31 - 1).seed == 2**64 - 1


def test_structured_outputs_params() -> None:
    params = SamplingParams(structured_outputs={"json": {"type": "object"}, "disable_any_whitespace": True})
    assert isinstance(params.structured_outputs, StructuredOutputsParams)
    assert params.structured_outputs.kind == "json" and params.structured_outputs.disable_any_whitespace
    same = StructuredOutputsParams(json={"type": "object"}, disable_any_whitespace=True)
    assert same.key() == params.structured_outputs.key() != StructuredOutputsParams(json={"type": "array"}).key()
    for bad, message in [({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"),
                         ({"json": "{not json"}, "not valid JSON"), ({"json": "[1]"}, "JSON schema"),
                         ({"choice": []}, "choice"), ({"regex": ""}, "regex"), ({"regexp": "a"}, "regexp"),
                         ({"json_object": True, "disable_any_whitespace": "yes"}, "disable_any_whitespace")]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(structured_outputs=bad)
