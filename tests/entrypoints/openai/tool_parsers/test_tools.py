import json

import jsonschema
import pytest

from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS, HermesToolParser, get_tool_parser
from pagedserve.entrypoints.openai.tool_parsers.tools import (
    named_schema,
    parse_required_output,
    required_schema,
    tools_system_prompt,
    validate_tool_choice,
    validate_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
EVENT = {  # pydantic-style schema: "$ref"s into "$defs"
    "type": "function",
    "function": {
        "name": "create_event",
        "parameters": {
            "type": "object",
            "properties": {"attendee": {"$ref": "#/$defs/Person"}},
            "required": ["attendee"],
            "$defs": {"Person": {"type": "object", "properties": {"email": {"type": "string"}}, "required": ["email"]}},
        },
    },
}
TOOLS = [WEATHER, TIME, EVENT]


def test_registry():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "mistral", "pythonic"}
    assert all(get_tool_parser(name).name == name for name in TOOL_PARSERS)
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic"):
        get_tool_parser("qwen")


def test_valid_tools_pass():
    validate_tools(TOOLS)
    validate_tools([{"type": "function", "function": {"name": "no_args", "parameters": {}}}])
    validate_tools([])


def _tool(name="f", **function):
    return {"type": "function", "function": {"name": name, **function}}


@pytest.mark.parametrize(
    "tools, message",
    [
        ({"type": "function"}, "must be a list"),
        ([{"type": "retrieval"}], r"tools\[0\] must be"),
        ([{"type": "function", "name": "f"}], r"tools\[0\] must be"),
        (["f"], r"tools\[0\] must be"),
        ([_tool(name="")], "1-64 letters"),
        ([_tool(name="get weather")], "1-64 letters"),
        ([_tool(name="x" * 65)], "1-64 letters"),
        ([_tool(name="f\n")], "1-64 letters"),
        ([_tool(name=None)], "1-64 letters"),
        ([_tool(), _tool(name="g"), _tool()], r"tools\[2\].function.name 'f' is used by another tool"),
        ([_tool(parameters="{}")], "must be a JSON Schema object"),
        ([_tool(parameters={"type": "array", "items": {}})], "must describe an object"),
        ([_tool(parameters={"type": "object", "properties": {"a": {"type": "strng"}}})], "not a valid JSON Schema"),
        ([_tool(parameters={"type": "object", "required": "a"})], "not a valid JSON Schema"),
    ],
)
def test_invalid_tools(tools, message):
    with pytest.raises(ValueError, match=message):
        validate_tools(tools)


@pytest.mark.parametrize(
    "choice", [None, "none", "auto", "required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_valid_tool_choice(choice):
    validate_tool_choice(choice, TOOLS)


def test_none_and_auto_without_tools():
    validate_tool_choice("none", None)
    validate_tool_choice("auto", [])


@pytest.mark.parametrize(
    "choice, tools, message",
    [
        ("required", [], "needs at least one tool"),
        ("required", None, "needs at least one tool"),
        ({"type": "function", "function": {"name": "f"}}, [], "there are no tools"),
        ({"type": "function", "function": {"name": "f"}}, TOOLS, "get_weather, get_time, create_event"),
        ("any", TOOLS, "tool_choice must be"),
        ({"type": "function", "name": "get_time"}, TOOLS, "tool_choice must be"),
        ({"type": "tool", "function": {"name": "get_time"}}, TOOLS, "tool_choice must be"),
        (True, TOOLS, "tool_choice must be"),
    ],
)
def test_invalid_tool_choice(choice, tools, message):
    with pytest.raises(ValueError, match=message):
        validate_tool_choice(choice, tools)


def test_named_schema():
    assert named_schema(TOOLS, "get_weather") is WEATHER["function"]["parameters"]
    assert named_schema(TOOLS, "get_time") == {"type": "object"}
    with pytest.raises(ValueError, match="no tool named"):
        named_schema(TOOLS, "nope")


def test_required_schema_accepts_exactly_calls_to_the_tools():
    schema = required_schema(TOOLS)
    jsonschema.validators.validator_for(schema).check_schema(schema)
    good = [
        {"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}},
        {"name": "get_time", "parameters": {}},
        {"name": "create_event", "parameters": {"attendee": {"email": "a@b.c"}}},
    ]
    jsonschema.validate(good, schema)
    bad = [
        [],
        [{"name": "get_weather"}],
        [{"name": "nope", "parameters": {}}],
        [{"name": "get_weather", "parameters": {"unit": "celsius"}}],
        [{"name": "get_weather", "parameters": {"city": "Paris", "unit": "kelvin"}}],
        [{"name": "get_time", "parameters": {}, "extra": 1}],
        [{"name": "create_event", "parameters": {"attendee": {}}}],  # only fails if the $ref resolves
        {"name": "get_time", "parameters": {}},
    ]
    for instance in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(instance, schema)


def test_required_schema_leaves_the_tools_alone_and_rejects_clashing_defs():
    required_schema(TOOLS)
    assert "$defs" in EVENT["function"]["parameters"]
    clash = json.loads(json.dumps(EVENT))
    clash["function"]["name"] = "other"
    clash["function"]["parameters"]["$defs"]["Person"] = {"type": "string"}
    with pytest.raises(ValueError, match=r"\$defs/Person"):
        required_schema([EVENT, clash])


def test_parse_required_output():
    text = '[{"name": "get_weather", "parameters": {"city": "Zürich"}}, {"name": "get_time", "parameters": {}}]'
    calls = parse_required_output(text)
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", '{"city": "Zürich"}'),
        ("get_time", "{}"),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") and c.type == "function" for c in calls)


@pytest.mark.parametrize(
    "text", ['[{"name": "get_time", "parameters": {', '{"name": "f", "parameters": {}}', '[{"name": 1}]']
)
def test_parse_required_output_rejects(text):
    with pytest.raises(ValueError, match="tool call output"):
        parse_required_output(text)


def test_tools_system_prompt():
    prompt = tools_system_prompt([WEATHER, TIME])
    lines = prompt.split("\n")
    start = lines.index("<tools>")
    assert [json.loads(line) for line in lines[start + 1 : start + 3]] == [WEATHER, TIME]
    assert lines[start + 3] == "</tools>"
    assert prompt.startswith("# Tools\n\nYou may call one or more functions to assist with the user query.")
    assert prompt.endswith('<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def test_answer_in_the_prompted_format_parses_with_hermes():
    prompt = tools_system_prompt([WEATHER])
    example = prompt[prompt.rindex("<tool_call>") :]
    answer = example.replace("<function-name>", '"get_weather"').replace("<args-json-object>", '{"city": "Oslo"}')
    result = HermesToolParser([WEATHER]).extract(answer)
    assert [(c.function.name, c.function.arguments) for c in result.tool_calls] == [("get_weather", '{"city": "Oslo"}')]
