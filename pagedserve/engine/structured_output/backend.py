"""The grammar backend interface, and what both backends share.

A backend compiles a `StructuredOutputsParams` into a grammar once for the tokenizer; each sample then gets a
`GrammarMatcher` that follows the tokens it accepts and writes which tokens may come next into a row of an
int32 bitmask (bit t % 32 of word t // 32 set: token t allowed). The stop tokens (every EOS id) are allowed
exactly where the grammar may end, and the matcher terminates once it has accepted one.

Whitespace in JSON (`json`, `json_object`, the schemas of structural tags) is bounded by default: at most
MAX_JSON_WHITESPACE (8) whitespace characters between two JSON tokens. That keeps compact, spaced and shallow
pretty-printed JSON (a newline and up to 7 spaces) legal, the bound vLLM #44619 proposes; unbounded whitespace
lets a model loop on spaces and newlines until max_tokens (vLLM #38696, #52011, xgrammar #212). On the tests'
random-weight model (temperature 1, a 5-field object) the median length was 74 tokens with a bound of 2, 108
with 8, 166 unbounded (longest 278). `disable_any_whitespace` allows none beyond the separators (compact JSON);
`whitespace_pattern` (a regex for the whitespace between tokens; guidance only) replaces the bound.
"""

import json
import re
from abc import ABC, abstractmethod
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pagedserve.sampling_params import StructuredOutputsParams

MAX_JSON_WHITESPACE = 8


class GrammarMatcher(ABC):
    """One sample's position in its grammar."""

    @abstractmethod
    def accept_tokens(self, token_ids: list[int]) -> bool:
        """Advance over the tokens; False if the grammar rejects one (the matcher is then not to be used)."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (a contiguous int32 CPU tensor)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and the stop token has been accepted."""


class GrammarBackend(ABC):
    """Compiles constraints for one tokenizer. `vocab_size` (the bitmask's width in bits) may exceed the
    tokenizer's length (a model's padded vocabulary): ids without a token are never allowed."""

    name: str

    @abstractmethod
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        """`eos_token_ids`: every id that ends a turn (the grammar's end allows each; empty: the tokenizer's)."""

    @staticmethod
    @abstractmethod
    def check(params: StructuredOutputsParams) -> None:
        """Parse the constraint without a tokenizer: a ValueError naming what is wrong (fast: no compilation)."""

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar (opaque, shared by every matcher of the same constraint)."""

    @abstractmethod
    def new_matcher(self, grammar: Any) -> GrammarMatcher:
        """A matcher at the start of the grammar."""


# ---- what the backends share -------------------------------------------------------------------------------

_XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
_WHAT = {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regex", "choice": "choice",
         "grammar": "grammar", "structural_tag": "structural tag"}


def invalid(params: StructuredOutputsParams, error: object) -> ValueError:
    """E.g. 'structured_outputs.json: invalid JSON schema: Unsupported type "objectx"'."""
    message = _XGRAMMAR_LOG_PREFIX.sub("", str(error)).strip()
    return ValueError(f"structured_outputs.{params.kind}: invalid {_WHAT[params.kind]}: {message}")


def json_schema_text(params: StructuredOutputsParams) -> str:
    """The schema of a `json` or `json_object` constraint, as JSON text."""
    if params.json_object:
        return '{"type": "object"}'
    return params.json if isinstance(params.json, str) else json.dumps(params.json)


def is_ebnf(grammar: str) -> bool:
    """GBNF/EBNF (`root ::= ...`) rather than Lark (`start: ...`)."""
    return "::=" in grammar


def structural_tag(params: StructuredOutputsParams) -> dict:
    """The parsed structural tag; vLLM's format ("structures" + "triggers") is checked here."""
    try:
        tag = json.loads(params.structural_tag or "")
    except ValueError as e:
        raise invalid(params, f"not JSON: {e}") from None
    if not isinstance(tag, dict):
        raise invalid(params, "a structural tag is a JSON object")
    if "structures" in tag:
        structures, triggers = tag["structures"], tag.get("triggers")
        if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
            raise invalid(params, '"triggers" must be a non-empty list of strings')
        if not isinstance(structures, list) or not structures or not all(
                isinstance(s, dict) and isinstance(s.get("begin"), str) and isinstance(s.get("schema"), dict)
                and isinstance(s.get("end"), str) for s in structures):
            raise invalid(params, '"structures" must be a non-empty list of {"begin", "schema", "end"} (text, an '
                                  'object, text)')
        for s in structures:
            if not any(s["begin"].startswith(t) for t in triggers):
                raise invalid(params, f"begin {s['begin']!r} starts with none of the triggers {triggers}")
    return tag


_SUBSCHEMA_KEYS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
_SCHEMA_LIST_KEYS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions")


def subschemas(schema: dict) -> list:
    """The schemas directly inside a schema (by keyword: a property named "items" is not a subschema)."""
    found = [schema[k] for k in _SUBSCHEMA_KEYS if isinstance(schema.get(k), dict)]
    found += [s for k in _SCHEMA_LIST_KEYS if isinstance(schema.get(k), list) for s in schema[k]]
    found += [s for k in _SCHEMA_MAP_KEYS if isinstance(schema.get(k), dict) for s in schema[k].values()]
    return [s for s in found if isinstance(s, dict)]
