"""llguidance ("guidance"): grammars become a lexer plus an Earley parser, run lazily per token; no
precompilation against the vocabulary, so compiling is quick and filling a mask costs more than xgrammar's."""

import copy
import json
from typing import TYPE_CHECKING, Any, cast

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pagedserve.engine.structured_output.backend import (
    MAX_JSON_WHITESPACE,
    GrammarBackend,
    GrammarMatcher,
    invalid,
    json_schema_text,
    structural_tag,
    subschemas,
)
from pagedserve.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions


class GuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: set[int]) -> None:
        self.matcher = matcher
        self.eos_token_ids = eos_token_ids
        # llguidance's "stopped" means "only EOS may follow" as well as "EOS accepted", and an EOS that comes
        # once it is stopped is not recorded as a token: rollback must not count it.
        self.terminated = False
        self.eos_unrecorded = False

    def accept_tokens(self, token_ids: list[int]) -> bool:
        for token_id in token_ids:  # one by one: consume_tokens() refuses the EOS of a stopped matcher
            stopped = self.matcher.is_stopped()
            if self.terminated or not self.matcher.consume_token(token_id):
                return False
            if token_id in self.eos_token_ids:
                self.terminated, self.eos_unrecorded = True, stopped
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), bitmask.shape[1] * bitmask.element_size())

    def rollback(self, num_tokens: int) -> None:
        if num_tokens and self.terminated:
            num_tokens -= self.eos_unrecorded
            self.terminated = False
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self.terminated


class GuidanceBackend(GrammarBackend):
    name = "guidance"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        # A slow (Python) tokenizer is refused by llguidance with a ValueError.
        fast = cast(PreTrainedTokenizerFast, tokenizer)
        self.tokenizer = llguidance.hf.from_tokenizer(fast, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None)

    @staticmethod
    def check(params: StructuredOutputsParams) -> None:
        error = llguidance.LLMatcher.validate_grammar(to_grammar(params))
        if error:
            raise invalid(params, error)

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A matcher at the start of the grammar, which each sample's matcher copies."""
        matcher = llguidance.LLMatcher(self.tokenizer, to_grammar(params), log_level=0)
        if matcher.is_error():
            raise invalid(params, matcher.get_error())
        return matcher

    def new_matcher(self, grammar: llguidance.LLMatcher) -> GuidanceMatcher:
        return GuidanceMatcher(grammar.deep_copy(), set(self.tokenizer.eos_tokens))


def to_grammar(params: StructuredOutputsParams) -> str:
    """The constraint as an llguidance grammar (its JSON text); a ValueError if it cannot be one."""
    tag = structural_tag(params) if params.structural_tag is not None else None
    if tag is not None and "structures" not in tag:
        raise invalid(params, 'guidance takes structural tags in vLLM\'s format ("structures" and "triggers")')
    try:
        if params.regex is not None:
            return llguidance.grammar_from("regex", params.regex)
        if params.choice is not None:
            return llguidance.grammar_from("choice", json.dumps(params.choice))
        if params.grammar is not None:
            return llguidance.grammar_from("grammar", params.grammar)
        if tag is not None:
            return _structural_tag_grammar(params, tag)
        schema = _schema(params, json.loads(json_schema_text(params)))
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_whitespace(params))
    except (ValueError, AssertionError) as e:  # llguidance's own (StructTag checks with asserts)
        raise invalid(params, e) from None


def _whitespace(params: StructuredOutputsParams) -> "JsonCompileOptions":
    if params.whitespace_pattern is not None:
        return {"whitespace_pattern": params.whitespace_pattern}
    if params.disable_any_whitespace:
        return {"whitespace_flexible": False}
    return {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_JSON_WHITESPACE}}}"}


def _schema(params: StructuredOutputsParams, schema: Any) -> Any:
    """With disable_additional_properties, every object schema that lists properties allows no others (unless
    it says so itself); xgrammar does this for every schema (its strict mode)."""
    if not params.disable_additional_properties:
        return schema
    schema = copy.deepcopy(schema)
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if "properties" in node:
                node.setdefault("additionalProperties", False)
            todo += subschemas(node)
    return schema


def _structural_tag_grammar(params: StructuredOutputsParams, tag: dict) -> str:
    tags = []
    for s in tag["structures"]:
        trigger = next(t for t in tag["triggers"] if s["begin"].startswith(t))
        schema = _schema(params, s["schema"])
        schema = {**schema, "x-guidance": {**_whitespace(params), **schema.get("x-guidance", {})}}
        tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"], grammar=schema, end=s["end"]))
    return llguidance.StructTag.to_grammar(tags)
