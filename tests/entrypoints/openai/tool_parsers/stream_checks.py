"""Shared by the parser tests: stream a text in many ways and compare with extract().

Imported by the test modules as a sibling (pytest puts this directory on sys.path; it has no __init__.py).
"""

import random
import re

from pagedserve.entrypoints.openai.tool_parsers import ToolParser

# Roughly how a BPE tokenizer cuts text: markers whole, runs of letters or spaces, single punctuation.
_TOKEN = re.compile(r"<\|?/?\w+\|?>|\[/?[A-Z_]+\]|\s+|\w+|[^\w\s]")


def token_chunks(text: str) -> list[str]:
    chunks = _TOKEN.findall(text)
    assert "".join(chunks) == text
    return chunks


def random_chunks(text: str, seed: int) -> list[str]:
    rng, chunks, pos = random.Random(seed), [], 0
    while pos < len(text):
        size = rng.randint(1, 6)
        chunks.append(text[pos : pos + size])
        pos += size
    return chunks


def stream(parser_cls: type[ToolParser], pieces: list[str], tools: list[dict] | None = None):
    """Feed pieces then finish; check the delta protocol; return (content, [(name, arguments), ...])."""
    parser = parser_cls(tools or [])
    deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    calls: list[list[str]] = []  # [id, name, arguments]
    for delta in deltas:
        for piece in delta.tool_calls:
            if piece.index == len(calls):  # the first delta of a call: id and complete name
                assert piece.id.startswith("call_") and piece.name, piece
                calls.append([piece.id, piece.name, piece.arguments])
            else:  # later deltas: only more arguments of the latest call
                assert (piece.index, piece.id, piece.name) == (len(calls) - 1, None, None), piece
                assert piece.arguments, piece
                calls[-1][2] += piece.arguments
    assert len({call[0] for call in calls}) == len(calls)
    return "".join(delta.content for delta in deltas), [(name, arguments) for _, name, arguments in calls]


def extracted(parser_cls: type[ToolParser], text: str, tools: list[dict] | None = None):
    """extract() as (content, [(name, arguments), ...]), checking the ids on the way."""
    result = parser_cls(tools or []).extract(text)
    assert result.content != ""  # empty content is None
    assert all(call.id.startswith("call_") and call.type == "function" for call in result.tool_calls)
    assert len({call.id for call in result.tool_calls}) == len(result.tool_calls)
    return result.content or "", [(call.function.name, call.function.arguments) for call in result.tool_calls]


def assert_streams_like_extract(parser_cls: type[ToolParser], text: str, tools: list[dict] | None = None) -> None:
    """Every two-piece split, one character at a time, token-sized and random chunks: all give what extract does."""
    expected = extracted(parser_cls, text, tools)
    ways = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    ways += [list(text), token_chunks(text)] + [random_chunks(text, seed) for seed in range(3)]
    for pieces in ways:
        assert stream(parser_cls, pieces, tools) == expected, pieces
