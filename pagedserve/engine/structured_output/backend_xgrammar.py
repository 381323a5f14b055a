"""xgrammar, the default backend: a grammar is compiled against the vocabulary into a pushdown automaton with
precomputed token masks, so filling a mask is cheap (microseconds per row)."""

import json
import os

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from pagedserve.engine.structured_output.backend import (
    MAX_JSON_WHITESPACE,
    GrammarBackend,
    GrammarMatcher,
    invalid,
    is_ebnf,
    json_schema_text,
    structural_tag,
    subschemas,
)
from pagedserve.sampling_params import StructuredOutputsParams


class XgrammarMatcher(GrammarMatcher):
    def __init__(self, grammar: xgr.CompiledGrammar) -> None:
        self.matcher = xgr.GrammarMatcher(grammar)

    def accept_tokens(self, token_ids: list[int]) -> bool:
        return all(self.matcher.accept_token(token_id) for token_id in token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XgrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(eos_token_ids) or None
        )
        # No cache of its own: the StructuredOutputManager caches compiled grammars by constraint.
        threads = max(1, min(8, (os.cpu_count() or 2) // 2))
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=threads, cache_enabled=False)

    @staticmethod
    def check(params: StructuredOutputsParams) -> None:
        to_grammar(params)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        return self.compiler.compile_grammar(to_grammar(params, self.tokenizer_info))

    def new_matcher(self, grammar: xgr.CompiledGrammar) -> XgrammarMatcher:
        return XgrammarMatcher(grammar)


def to_grammar(params: StructuredOutputsParams, tokenizer_info: xgr.TokenizerInfo | None = None) -> xgr.Grammar:
    """The constraint as an xgrammar Grammar (parsed, not compiled); a ValueError naming what is wrong."""
    if params.whitespace_pattern is not None:
        raise invalid(params, "whitespace_pattern needs the guidance backend (xgrammar bounds whitespace by count)")
    try:
        if params.regex is not None:
            return xgr.Grammar.from_regex(params.regex)
        if params.choice is not None:
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in params.choice))
        if params.grammar is not None:
            if is_ebnf(params.grammar):
                return xgr.Grammar.from_ebnf(params.grammar)
            return xgr.Grammar.from_lark(params.grammar, tokenizer_info=tokenizer_info)
        if params.structural_tag is not None:
            return xgr.Grammar.from_structural_tag(json.dumps(_structural_tag(params)))
        schema = json_schema_text(params)
        keyword = unenforced_json_keyword(json.loads(schema))
        if keyword is not None:
            raise invalid(params, f"xgrammar does not enforce {keyword}")
        return xgr.Grammar.from_json_schema(schema, **_whitespace(params))
    except RuntimeError as e:  # xgrammar's parse errors (InvalidJSONError etc. are RuntimeErrors too)
        raise invalid(params, e) from None


def _whitespace(params: StructuredOutputsParams) -> dict:
    if params.disable_any_whitespace:
        return {"any_whitespace": False}
    return {"any_whitespace": True, "max_whitespace_cnt": MAX_JSON_WHITESPACE}


def _structural_tag(params: StructuredOutputsParams) -> dict:
    """vLLM's format ("structures" + "triggers") in xgrammar's own; xgrammar's own format passes through."""
    tag = structural_tag(params)
    if "structures" not in tag:
        return tag
    if params.disable_any_whitespace:
        raise invalid(params, "xgrammar cannot forbid whitespace in a structural tag's JSON (guidance can)")
    tags = [
        {"type": "tag", "begin": s["begin"], "end": s["end"],
         "content": {"type": "json_schema", "json_schema": s["schema"], "max_whitespace_cnt": MAX_JSON_WHITESPACE}}
        for s in tag["structures"]
    ]
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": tag["triggers"], "tags": tags}}


def unenforced_json_keyword(schema: object) -> str | None:
    """A keyword xgrammar 0.2 accepts but does not enforce as written (checked against the grammar it makes), or
    None: `contains` (and min/maxContains) and `uniqueItems` are dropped, and a string with minLength/maxLength
    becomes a bounded run of any characters but quote, backslash, CR and LF: raw control characters (invalid
    JSON) pass and escapes cannot be written (xgrammar #800)."""
    if not isinstance(schema, dict):
        return None
    for keyword in ("contains", "minContains", "maxContains", "uniqueItems", "minLength", "maxLength"):
        if keyword in schema:
            return keyword
    return next(filter(None, map(unenforced_json_keyword, subschemas(schema))), None)
