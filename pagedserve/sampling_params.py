"""Per-request sampling parameters, mirroring vLLM's ``SamplingParams`` names, defaults and checks."""

from __future__ import annotations

import copy
import dataclasses
import enum
import json as _json
import logging
import math
import numbers
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Temperatures below this mean greedy decoding (same constant as vLLM).
SAMPLING_EPS = 1e-5
# Positive temperatures below this are raised to it: dividing logits by a tinier number overflows.
MIN_RANDOM_TEMPERATURE = 1e-2
# Upper bound for logprobs / prompt_logprobs (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1
# Every other integer must fit an int64: it travels in tensors and msgpack messages.
_INT64_MAX = 2**63 - 1
_TOP_K_MAX = 2**31 - 1


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output carries everything generated so far
    DELTA = 1  # only what is new since the last output (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_int(name: str, value: object, high: int = _INT64_MAX) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    number = int(value)  # type: ignore[call-overload]
    if number > high:
        raise ValueError(f"{name} must be at most {high}, got {number}")
    return number


def _as_optional_int(name: str, value: object) -> int | None:
    return None if value is None else _as_int(name, value)


def check_text(name: str, text: str) -> str:
    """Text must be valid Unicode: a lone surrogate (JSON allows "\\ud800") cannot be encoded or tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode (it contains a lone surrogate)") from None
    return text


def _as_float(name: str, value: object) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
    raise ValueError(f"{name} must be a finite number, got {value!r}")


def _as_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _as_token_id(name: str, value: object) -> int:
    """A non-negative int64; the engine checks it against the vocabulary (`validate_request`)."""
    if not _is_int(value) or not 0 <= value <= _INT64_MAX:  # type: ignore[operator]
        raise ValueError(f"{name} must contain token ids (non-negative integers), got {value!r}")
    return int(value)  # type: ignore[call-overload]


@dataclass
class StructuredOutputsParams:
    """Constrained decoding, with vLLM's names: exactly one of `json` (a JSON schema, as a dict or its text),
    `regex`, `choice`, `grammar` (EBNF or Lark), `json_object` (any JSON object) or `structural_tag` (JSON
    text: free text until a trigger, then the tagged structures); plus options for the JSON ones.

    Only the form is checked here; whether the engine's grammar backend can compile it is checked when the
    request is added (a ValueError naming what is wrong).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs needs exactly one of {', '.join(_CONSTRAINTS)}; got "
                f"{', '.join(given) if given else 'none'}"
            )
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    parsed = _json.loads(check_text("structured_outputs.json", self.json))
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            else:
                parsed = self.json
            if not isinstance(parsed, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {parsed!r}")
        for name in ("regex", "grammar", "structural_tag", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
            if value is not None:
                check_text(f"structured_outputs.{name}", value)
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice or not all(
                    isinstance(c, str) for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}")
            for c in self.choice:
                check_text("structured_outputs.choice", c)
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            _as_bool(f"structured_outputs.{name}", getattr(self, name))

    @classmethod
    def from_dict(cls, fields: dict) -> StructuredOutputsParams:
        """From a request's JSON object; ValueError (not TypeError) for an unknown field."""
        try:
            return cls(**fields)
        except TypeError as e:
            raise ValueError(f"structured_outputs: {e}") from None

    @property
    def kind(self) -> str:
        """Which constraint this is: "json", "regex", "choice", "grammar", "json_object" or "structural_tag"."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))

    def key(self) -> str:
        """A canonical text of the constraint and its options: equal keys compile to the same grammar."""
        return _json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class SamplingParams:
    """Sampling parameters for one request.

    After construction the fields are normalised: ``stop`` and ``stop_token_ids`` are lists,
    ``top_k`` is 0 when disabled, numeric fields are plain ``float``/``int``, ``logprobs=True`` is 1,
    ``seed=-1`` is None, and greedy requests (temperature < 1e-5) have top_p/top_k/min_p switched off.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self.n = _as_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")

        self.presence_penalty = _as_float("presence_penalty", self.presence_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        self.frequency_penalty = _as_float("frequency_penalty", self.frequency_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be greater than 0, got {self.repetition_penalty}")

        self.temperature = _as_float("temperature", self.temperature)
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if SAMPLING_EPS <= self.temperature < MIN_RANDOM_TEMPERATURE:
            logger.warning(
                "temperature %s is below %s and may produce inf/nan; raised to %s",
                self.temperature,
                MIN_RANDOM_TEMPERATURE,
                MIN_RANDOM_TEMPERATURE,
            )
            self.temperature = MIN_RANDOM_TEMPERATURE

        self.top_p = _as_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _as_int("top_k", self.top_k, _TOP_K_MAX)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or at least 1, got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _as_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

        self.seed = None if self.seed is None else _as_int("seed", self.seed, _SEED_MAX)
        if self.seed == -1:
            self.seed = None
        if self.seed is not None and not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise ValueError(f"seed must be in [{_SEED_MIN}, {_SEED_MAX}], got {self.seed}")

        self.stop = self._normalise_stop(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = [_as_token_id("stop_token_ids", t) for t in self.stop_token_ids]
        else:
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")

        self.ignore_eos = _as_bool("ignore_eos", self.ignore_eos)
        self.skip_special_tokens = _as_bool("skip_special_tokens", self.skip_special_tokens)
        self.spaces_between_special_tokens = _as_bool(
            "spaces_between_special_tokens", self.spaces_between_special_tokens
        )
        self.include_stop_str_in_output = _as_bool(
            "include_stop_str_in_output", self.include_stop_str_in_output
        )

        self.max_tokens = _as_optional_int("max_tokens", self.max_tokens)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        self.min_tokens = _as_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}"
            )

        self.logprobs = self._normalise_logprobs("logprobs", self.logprobs)
        self.prompt_logprobs = self._normalise_logprobs("prompt_logprobs", self.prompt_logprobs)
        self.logit_bias = self._normalise_logit_bias(self.logit_bias)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be StructuredOutputsParams, got {self.structured_outputs!r}")
        self.output_kind = RequestOutputKind(self.output_kind)

        if self.temperature < SAMPLING_EPS:
            # Greedy decoding: truncation has no effect on the argmax, so switch it off (as vLLM does).
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling (temperature=0), got {self.n}")

    @staticmethod
    def _normalise_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        if any(not s for s in stops):
            raise ValueError("stop cannot contain an empty string")
        return [check_text("stop", s) for s in stops]

    @staticmethod
    def _normalise_logprobs(name: str, value: object) -> int | None:
        if value is True:  # vLLM accepts logprobs=True as "1 alternative".
            value = 1
        count = _as_optional_int(name, value)
        if count is not None and not 0 <= count <= MAX_LOGPROBS:
            raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {count}")
        return count

    @staticmethod
    def _normalise_logit_bias(logit_bias: object) -> dict[int, float] | None:
        """Keys may be ints or decimal strings (JSON object keys are strings); values finite numbers."""
        if logit_bias is None:
            return None
        if not isinstance(logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {logit_bias!r}")
        normalised: dict[int, float] = {}
        for key, bias in logit_bias.items():
            token = key
            if isinstance(key, str):
                try:
                    token = int(key)
                except ValueError:
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
            normalised[_as_token_id("logit_bias", token)] = _as_float("logit_bias", bias)
        return normalised

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == SamplingType.GREEDY

    @property
    def output_text_buffer_length(self) -> int:
        """Characters the detokenizer must hold back so a stop string is never streamed out partially."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
