import json

import pytest
from stream_checks import assert_streams_like_extract

from pagedserve.entrypoints.openai.tool_parsers import PythonicToolParser, get_tool_parser

# (model output, expected content, expected [(name, arguments)])
CASES = {
    "one call": (
        '[get_weather(city="San Francisco", metric="celsius")]',
        None,
        [("get_weather", '{"city": "San Francisco", "metric": "celsius"}')],
    ),
    "two calls, single quotes, bool": (
        "[get_weather(city='Paris'), get_time(timezone=\"Europe/Paris\", h24=True)]",
        None,
        [("get_weather", '{"city": "Paris"}'), ("get_time", '{"timezone": "Europe/Paris", "h24": true}')],
    ),
    "llama 4 tags": (
        '<|python_start|>[search(query="llamas", limit=5)]<|python_end|>',
        None,
        [("search", '{"query": "llamas", "limit": 5}')],
    ),
    "every literal kind": (
        '[f(a=1, b=-2.5, c=None, d=true, e=false, f=null, g=[1, "x"], h={"k": [1, {"n": None}], 2: +3}, i=(1, 2))]',
        None,
        [
            (
                "f",
                '{"a": 1, "b": -2.5, "c": null, "d": true, "e": false, "f": null, "g": [1, "x"], '
                '"h": {"k": [1, {"n": null}], "2": 3}, "i": [1, 2]}',
            )
        ],
    ),
    "no arguments": ("[get_time()]", None, [("get_time", "{}")]),
    "strings with parens, brackets, quotes and escapes": (
        '[run(code="print(\\")\\")", pattern=\'[a-z]+\\\'\', doc="""two\nlines) ]""", empty="")]',
        None,
        [("run", json.dumps({"code": 'print(")")', "pattern": "[a-z]+'", "doc": "two\nlines) ]", "empty": ""}))],
    ),
    "unicode": (
        '[translate(text="Grüße 🌍", target="日本語")]',
        None,
        [("translate", '{"text": "Grüße 🌍", "target": "日本語"}')],
    ),
    "content after the list": ("[f(a=1)]\n\nDone.", "Done.", [("f", '{"a": 1}')]),
    "plain content": ("I don't know (yet).", "I don't know (yet).", []),
    "a list that is not calls": ("[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
    "a non-literal argument is content": ("[get_weather(city=Paris)]", "[get_weather(city=Paris)]", []),
    "positional arguments are content": ("  [f(1, 2)]", "  [f(1, 2)]", []),
    "a bad second call ends the calls": (
        "[a(x=1), b(y=undefined)]",
        ", b(y=undefined)]",
        [("a", '{"x": 1}')],
    ),
    "cut off is content": ('[get_weather(city="Par', '[get_weather(city="Par', []),
    "unknown tool name is still a call": ("[launch_rockets(count=3)]", None, [("launch_rockets", '{"count": 3}')]),
}


@pytest.mark.parametrize("text, content, calls", CASES.values(), ids=CASES.keys())
def test_extract(text, content, calls):
    result = PythonicToolParser([]).extract(text)
    assert result.content == content
    assert [(call.function.name, call.function.arguments) for call in result.tool_calls] == calls


@pytest.mark.parametrize("text", [case[0] for case in CASES.values()], ids=CASES.keys())
def test_streaming_matches_extract(text):
    assert_streams_like_extract(PythonicToolParser, text)


def test_registered():
    assert get_tool_parser("pythonic") is PythonicToolParser


def test_each_call_is_sent_whole_when_its_parenthesis_closes():
    parser = PythonicToolParser([])
    assert parser.feed('[get_weather(city="Paris (FR)"').tool_calls == []
    [first] = parser.feed("), get_ti").tool_calls
    assert (first.index, first.name, first.arguments) == (0, "get_weather", '{"city": "Paris (FR)"}')
    assert parser.feed("me(").tool_calls == []
    [second] = parser.feed(")]").tool_calls
    assert (second.index, second.name, second.arguments) == (1, "get_time", "{}")
    assert parser.finish().content == ""


def test_no_structural_tag():
    assert PythonicToolParser.structural_tag([{"type": "function", "function": {"name": "f"}}]) is None
