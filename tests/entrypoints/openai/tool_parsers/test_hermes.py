import json

import pytest
from stream_checks import assert_streams_like_extract

from pagedserve.entrypoints.openai.tool_parsers import HermesToolParser, get_tool_parser

WEATHER = '{"location": "San Francisco, CA", "unit": "fahrenheit"}'
EVENT = (
    '{"title": "Standup", "attendees": [{"email": "ana@example.com", "optional": false}], '
    '"recurrence": {"freq": "weekly", "days": ["mon", "wed"]}, "reminder": null, "priority": 2.5}'
)
CODE = r'{"code": "print(\"}{\")\nx = \"</tool_call>\"", "path": "C:\\tmp\\", "pattern": "[{<tool_call>"}'
UNICODE = '{"text": "Grüße aus Zürich 🌍", "target": "日本語", "note": "caf\\u00e9"}'
PRETTY = '{\n    "query": "pizza",\n    "filters": {\n        "open_now": true\n    }\n}'

# (model output, expected content, expected [(name, arguments)])
CASES = {
    "single call": (
        f'<tool_call>\n{{"name": "get_current_weather", "arguments": {WEATHER}}}\n</tool_call>',
        None,
        [("get_current_weather", WEATHER)],
    ),
    "content then two calls": (
        "I'll check both cities for you.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>',
        "I'll check both cities for you.",
        [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Tokyo"}')],
    ),
    "nested objects": (
        f'<tool_call>\n{{"name": "create_event", "arguments": {EVENT}}}\n</tool_call>',
        None,
        [("create_event", EVENT)],
    ),
    "escaped quotes, braces and tags inside strings": (
        f'<tool_call>\n{{"name": "run_code", "arguments": {CODE}}}\n</tool_call>',
        None,
        [("run_code", CODE)],
    ),
    "unicode": (
        f'Traduzco.\n\n<tool_call>\n{{"name": "translate", "arguments": {UNICODE}}}\n</tool_call>',
        "Traduzco.",
        [("translate", UNICODE)],
    ),
    "pretty-printed compact and spaced": (
        f'<tool_call>\n{{"name":"search","arguments":{PRETTY}}}\n</tool_call>\n'
        '<tool_call>\n{ "name" : "get_time" , "arguments" : { } }\n</tool_call>\n',
        None,
        [("search", PRETTY), ("get_time", "{ }")],
    ),
    "empty and missing arguments": (
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "list_files"}\n</tool_call>',
        None,
        [("get_time", "{}"), ("list_files", "{}")],
    ),
    "content after the calls": (
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n\nDone, see above.',
        "Done, see above.",
        [("f", '{"a": 1}')],
    ),
    "no call": ("The capital of France is Paris.\n", "The capital of France is Paris.\n", []),
    "marker look-alikes are content": (
        "Compare a < b, then use <tool> or <tool_calls> tags.",
        "Compare a < b, then use <tool> or <tool_calls> tags.",
        [],
    ),
    "unknown tool name is still a call": (
        '<tool_call>\n{"name": "launch_rockets", "arguments": {"count": 3}}\n</tool_call>',
        None,
        [("launch_rockets", '{"count": 3}')],
    ),
    "invalid JSON is content": (
        "Let me try.\n<tool_call>\n{'name': 'f', 'arguments': {}}\n</tool_call>",
        "Let me try.\n<tool_call>\n{'name': 'f', 'arguments': {}}\n</tool_call>",
        [],
    ),
    "arguments before name is content, later calls still parse": (
        '<tool_call>\n{"arguments": {}, "name": "f"}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {"x": [1, 2]}}\n</tool_call>',
        '<tool_call>\n{"arguments": {}, "name": "f"}\n</tool_call>',
        [("g", '{"x": [1, 2]}')],
    ),
    "non-object arguments are content": (
        '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
        [],
    ),
    "cut off in the header is content": (
        'Sure.\n<tool_call>\n{"name": "sea',
        'Sure.\n<tool_call>\n{"name": "sea',
        [],
    ),
    "cut off in the arguments keeps what was streamed": (
        '<tool_call>\n{"name": "search", "arguments": {"query": "best pizza in',
        None,
        [("search", '{"query": "best pizza in')],
    ),
    "malformed arguments after the header stay the call's text": (
        '<tool_call>\n{"name": "f", "arguments": {"a": 1,}}\n</tool_call>',
        None,
        [("f", '{"a": 1,}')],
    ),
    "missing closing brace and tags are forgiven": (
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>\n'
        '<tool_call>{"name":"b","arguments":{"y":2}}<tool_call>{"name":"c","arguments":{}}',
        None,
        [("a", '{"x": 1}'), ("b", '{"y":2}'), ("c", "{}")],
    ),
}


@pytest.mark.parametrize("text, content, calls", CASES.values(), ids=CASES.keys())
def test_extract(text, content, calls):
    result = HermesToolParser([]).extract(text)
    assert result.content == content
    assert [(call.function.name, call.function.arguments) for call in result.tool_calls] == calls


@pytest.mark.parametrize("text", [case[0] for case in CASES.values()], ids=CASES.keys())
def test_streaming_matches_extract(text):
    assert_streams_like_extract(HermesToolParser, text)


def test_registered():
    assert get_tool_parser("hermes") is HermesToolParser
    assert not HermesToolParser.keeps_special_tokens


def test_marker_prefix_is_held_back_then_released():
    parser = HermesToolParser([])
    assert parser.feed("Hello <tool_").content == "Hello"
    assert parser.feed("box> and").content == " <tool_box> and"
    assert parser.feed(" <tool").content == ""
    assert parser.finish().content == " <tool"


def test_call_text_never_reaches_content():
    parser = HermesToolParser([])
    assert parser.feed("Checking.\n<tool_call>\n").content == "Checking."
    delta = parser.feed('{"name": "get_weather", "arguments": {"ci')
    assert delta.content == ""
    [first] = delta.tool_calls
    assert (first.index, first.name, first.arguments) == (0, "get_weather", '{"ci')
    assert first.id.startswith("call_")
    delta = parser.feed('ty": "Paris"}}\n</tool_call>\n')
    assert delta.content == ""
    assert [(d.index, d.id, d.name, d.arguments) for d in delta.tool_calls] == [(0, None, None, 'ty": "Paris"}')]
    assert parser.finish().content == ""


def test_name_is_sent_only_when_complete():
    parser = HermesToolParser([])
    assert parser.feed('<tool_call>\n{"name": "get_wea').tool_calls == []
    assert parser.feed('ther", "argu').tool_calls == []
    assert parser.feed('ments": ').tool_calls == []  # "arguments" might still hold a string: not a call
    [first] = parser.feed("{").tool_calls
    assert (first.index, first.name, first.arguments) == (0, "get_weather", "{")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]


def test_structural_tag_shape():
    tag = HermesToolParser.structural_tag(TOOLS)
    assert tag["type"] == "structural_tag"
    assert tag["triggers"] == ["<tool_call>"]
    assert tag["structures"] == [
        {
            "begin": '<tool_call>\n{"name": "get_weather", "arguments": ',
            "schema": TOOLS[0]["function"]["parameters"],
            "end": "}\n</tool_call>",
        },
        {
            "begin": '<tool_call>\n{"name": "get_time", "arguments": ',
            "schema": {"type": "object"},
            "end": "}\n</tool_call>",
        },
    ]


@pytest.mark.parametrize("arguments", [{"city": 'Zürich "centre" {}'}, {}])
def test_structural_tag_output_parses_back(arguments):
    tag = HermesToolParser.structural_tag(TOOLS)
    for structure, tool in zip(tag["structures"], TOOLS):
        assert structure["begin"].startswith(tuple(tag["triggers"]))
        text = "Sure.\n" + structure["begin"] + json.dumps(arguments) + structure["end"]
        result = HermesToolParser(TOOLS).extract(text)
        assert result.content == "Sure."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in result.tool_calls] == [
            (tool["function"]["name"], arguments)
        ]
