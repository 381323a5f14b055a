import pytest
from stream_checks import assert_streams_like_extract

from pagedserve.entrypoints.openai.tool_parsers import MistralToolParser, get_tool_parser

PARIS = '{"city": "Paris", "unit": "celsius"}'
TRICKY = '{"text": "He said \\"[TOOL_CALLS]\\" and ]}", "tags": ["a", {"b": [1, 2]}], "note": "日本語 🌍"}'

# (model output, expected content, expected [(name, arguments)])
CASES = {
    "classic list": (
        f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}]',
        None,
        [("get_weather", PARIS)],
    ),
    "classic list of two, space after the marker": (
        f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {PARIS}}}, {{"name": "get_time", "arguments": {{}}}}]',
        None,
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    "content before the calls": (
        'Sure, let me look that up.[TOOL_CALLS][{"name": "search", "arguments": {"q": "mistral"}}]',
        "Sure, let me look that up.",
        [("search", '{"q": "mistral"}')],
    ),
    "classic with an id key, nested and escaped strings": (
        f'[TOOL_CALLS][{{"name": "note", "arguments": {TRICKY}, "id": "a1B2c3D4e"}}]',
        None,
        [("note", TRICKY)],
    ),
    "classic with missing arguments": (
        '[TOOL_CALLS][{"name": "list_files"}, {"name": "f", "arguments": {"a": 1}}]',
        None,
        [("list_files", "{}"), ("f", '{"a": 1}')],
    ),
    "named form": (
        f"[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS]get_time[ARGS]{{}}",
        None,
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    "named form, then content": (
        '[TOOL_CALLS]a[ARGS]{"x": {"y": 1}}[TOOL_CALLS]b[ARGS]{"z": [{}]} All done {ok}.',
        "All done {ok}.",
        [("a", '{"x": {"y": 1}}'), ("b", '{"z": [{}]}')],
    ),
    "named form without [ARGS], with content": (
        f"Checking.\n[TOOL_CALLS]get_weather{PARIS}\n[TOOL_CALLS] note{TRICKY}",
        "Checking.",
        [("get_weather", PARIS), ("note", TRICKY)],
    ),
    "no call": (
        "Arrays look like [1, 2] and [TOOL] is not a marker.",
        "Arrays look like [1, 2] and [TOOL] is not a marker.",
        [],
    ),
    "not a call after the marker is content": (
        "Hmm.[TOOL_CALLS] I cannot call tools here.",
        "Hmm.[TOOL_CALLS] I cannot call tools here.",
        [],
    ),
    "invalid JSON in the list is content": (
        "[TOOL_CALLS][{'name': 'f', 'arguments': {}}]",
        "[TOOL_CALLS][{'name': 'f', 'arguments': {}}]",
        [],
    ),
    "malformed second item: the rest is content": (
        '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"arguments": {}}]',
        ', {"arguments": {}}]',
        [("f", "{}")],
    ),
    "content after the list": (
        '[TOOL_CALLS][{"name": "f", "arguments": {"a": [1]}}]\nDone.',
        "Done.",
        [("f", '{"a": [1]}')],
    ),
    "cut off in the named arguments keeps what was streamed": (
        '[TOOL_CALLS]search[ARGS]{"q": "best pizza',
        None,
        [("search", '{"q": "best pizza')],
    ),
    "cut off in the name is content": ("[TOOL_CALLS]sear", "[TOOL_CALLS]sear", []),
    "cut off right after the marker": ("Ok [TOOL_CALLS]", "Ok [TOOL_CALLS]", []),
    "unknown tool name is still a call": (
        '[TOOL_CALLS]launch_rockets[ARGS]{"count": 3}',
        None,
        [("launch_rockets", '{"count": 3}')],
    ),
}


@pytest.mark.parametrize("text, content, calls", CASES.values(), ids=CASES.keys())
def test_extract(text, content, calls):
    result = MistralToolParser([]).extract(text)
    assert result.content == content
    assert [(call.function.name, call.function.arguments) for call in result.tool_calls] == calls


@pytest.mark.parametrize("text", [case[0] for case in CASES.values()], ids=CASES.keys())
def test_streaming_matches_extract(text):
    assert_streams_like_extract(MistralToolParser, text)


def test_registered_and_keeps_special_tokens():
    assert get_tool_parser("mistral") is MistralToolParser
    assert MistralToolParser.keeps_special_tokens


def test_marker_is_held_back():
    parser = MistralToolParser([])
    assert parser.feed("Let me check [TOOL_").content == "Let me check"
    assert parser.feed("CALLS]get_weather[AR").content == ""
    [first] = parser.feed('GS]{"city": ').tool_calls
    assert (first.index, first.name, first.arguments) == (0, "get_weather", '{"city": ')


def test_no_structural_tag():
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert MistralToolParser.structural_tag(tools) is None
