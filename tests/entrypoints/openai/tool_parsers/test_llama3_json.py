import json

import pytest
from stream_checks import assert_streams_like_extract

from pagedserve.entrypoints.openai.tool_parsers import Llama3JsonToolParser, get_tool_parser

PARIS = '{"city": "Paris", "unit": "celsius"}'
SQL = '{"query": "SELECT * FROM t WHERE a = \'}\'; DROP TABLE x; -- {\\"q\\": 1}", "limit": [1, {"n": null}]}'
UNICODE = '{"text": "Grüße 🌍 日本語", "escaped": "\\u00e9\\n"}'

# (model output, expected content, expected [(name, arguments)])
CASES = {
    "python tag": (
        f'<|python_tag|>{{"name": "get_weather", "parameters": {PARIS}}}',
        None,
        [("get_weather", PARIS)],
    ),
    "two calls joined by ;": (
        f'{{"name": "get_weather", "parameters": {PARIS}}}; '
        '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}',
        None,
        [("get_weather", PARIS), ("get_time", '{"timezone": "Europe/Paris"}')],
    ),
    "arguments key, leading whitespace, newline separator": (
        '\n\n{"name": "a", "arguments": {"x": 1}};\n{"name":"b","parameters":{"y":[2, 3]}}',
        None,
        [("a", '{"x": 1}'), ("b", '{"y":[2, 3]}')],
    ),
    "strings with ; and braces": (
        f'{{"name": "sql", "parameters": {SQL}}}',
        None,
        [("sql", SQL)],
    ),
    "unicode": (f'{{"name": "translate", "parameters": {UNICODE}}}', None, [("translate", UNICODE)]),
    "empty and missing parameters": (
        '{"name": "get_time", "parameters": {}}; {"name": "list_files"}',
        None,
        [("get_time", "{}"), ("list_files", "{}")],
    ),
    "extra keys after the parameters are dropped": (
        '{"name": "f", "parameters": {"a": "}"}, "id": "x{"}; {"name": "g", "parameters": {}}',
        None,
        [("f", '{"a": "}"}'), ("g", "{}")],
    ),
    "content after the calls": (
        '<|python_tag|>{"name": "f", "parameters": {"a": 1}}\n\nLet me know if that helps.',
        "Let me know if that helps.",
        [("f", '{"a": 1}')],
    ),
    "plain content": ("The weather in Paris is sunny {mostly}.", "The weather in Paris is sunny {mostly}.", []),
    "content that starts like the tag": ("<|python_ta", "<|python_ta", []),
    "a JSON answer that is not a call": ('  {"answer": 42, "name": "x"}', '  {"answer": 42, "name": "x"}', []),
    "a call after content is content": (
        'Here: {"name": "f", "parameters": {}}',
        'Here: {"name": "f", "parameters": {}}',
        [],
    ),
    "cut off in the second header": (
        '{"name": "f", "parameters": {"a": 1}}; {"nam',
        '; {"nam',
        [("f", '{"a": 1}')],
    ),
    "cut off in the arguments keeps what was streamed": (
        '{"name": "search", "parameters": {"q": "best pizza',
        None,
        [("search", '{"q": "best pizza')],
    ),
    "only whitespace": (" \n", " \n", []),
}


@pytest.mark.parametrize("text, content, calls", CASES.values(), ids=CASES.keys())
def test_extract(text, content, calls):
    result = Llama3JsonToolParser([]).extract(text)
    assert result.content == content
    assert [(call.function.name, call.function.arguments) for call in result.tool_calls] == calls


@pytest.mark.parametrize("text", [case[0] for case in CASES.values()], ids=CASES.keys())
def test_streaming_matches_extract(text):
    assert_streams_like_extract(Llama3JsonToolParser, text)


def test_registered():
    assert get_tool_parser("llama3_json") is Llama3JsonToolParser


def test_streams_arguments_as_they_come():
    parser = Llama3JsonToolParser([])
    assert parser.feed("<|python_").content == ""
    [first] = parser.feed('tag|>{"name": "get_weather", "parameters": {"city": "Pa').tool_calls
    assert (first.index, first.name, first.arguments) == (0, "get_weather", '{"city": "Pa')
    deltas = parser.feed('ris"}}; {"name": "g", "parameters": {').tool_calls
    assert [(d.index, d.id is None, d.name, d.arguments) for d in deltas] == [
        (0, True, None, 'ris"}'),
        (1, False, "g", "{"),
    ]
    finished = parser.finish()
    assert finished.content == ""
    assert [(d.index, d.arguments) for d in finished.tool_calls] == []


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {}}},
]


def test_structural_tag_shape():
    tag = Llama3JsonToolParser.structural_tag(TOOLS)
    assert tag == {
        "type": "structural_tag",
        "structures": [
            {
                "begin": '{"name": "get_weather", "parameters": ',
                "schema": TOOLS[0]["function"]["parameters"],
                "end": "}",
            },
            {"begin": '{"name": "get_time", "parameters": ', "schema": {"type": "object"}, "end": "}"},
        ],
        "triggers": ['{"name": '],
    }


@pytest.mark.parametrize("arguments", [{"city": "São Paulo; {x}"}, {}])
def test_structural_tag_output_parses_back(arguments):
    tag = Llama3JsonToolParser.structural_tag(TOOLS)
    for structure, tool in zip(tag["structures"], TOOLS):
        assert structure["begin"].startswith(tuple(tag["triggers"]))
        text = structure["begin"] + json.dumps(arguments) + structure["end"]
        result = Llama3JsonToolParser(TOOLS).extract(text)
        assert result.content is None
        assert [(c.function.name, c.function.arguments) for c in result.tool_calls] == [
            (tool["function"]["name"], json.dumps(arguments))
        ]
