"""Server-side helpers for the `tools` and `tool_choice` request fields, whatever the tool parser."""

import json
import re

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from .base import FunctionCall, ToolCall, parameters_schema

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
_DEFINITION_KEYS = ("$defs", "definitions")  # where "#/$defs/..." refs point: must stay at the schema root


def validate_tools(tools: list) -> None:
    """ValueError naming the first tool that is not a well-formed OpenAI function tool."""
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list, got {type(tools).__name__}")
    names = set()
    for i, tool in enumerate(tools):
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)):
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}, got {tool!r}')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in names:
            raise ValueError(f"tools[{i}].function.name {name!r} is used by another tool")
        names.add(name)
        if function.get("parameters") is not None:
            _check_parameters(function["parameters"], f"tools[{i}].function.parameters")


def _check_parameters(schema: object, where: str) -> None:
    """An object schema. One without a "type" (such as {}) is allowed: clients send {} for tools without
    arguments."""
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON Schema object, got {schema!r}")
    if schema.get("type", "object") != "object":
        raise ValueError(f'{where} must describe an object ("type": "object"), got "type": {schema["type"]!r}')
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        raise ValueError(f"{where} is not a valid JSON Schema: {e.message}") from None


def validate_tool_choice(tool_choice: object, tools: list | None) -> None:
    """ValueError if tool_choice is not none/auto/required/a named function, or asks for a tool it cannot have.
    `tools` must have passed validate_tools."""
    names = [tool["function"]["name"] for tool in tools or []]
    if tool_choice is None or tool_choice in ("none", "auto"):
        return
    if tool_choice == "required":
        if not names:
            raise ValueError('tool_choice "required" needs at least one tool in tools')
        return
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(name, str)):
        raise ValueError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}, '
            f"got {tool_choice!r}"
        )
    if name not in names:
        known = f"the tools are {', '.join(names)}" if names else "there are no tools"
        raise ValueError(f"tool_choice names the function {name!r}, but {known}")


def named_schema(tools: list[dict], name: str) -> dict:
    """The schema of the named tool's arguments (for tool_choice naming it: the output is the arguments)."""
    for tool in tools:
        if tool["function"]["name"] == name:
            return parameters_schema(tool)
    raise ValueError(f"no tool named {name!r}")


def required_schema(tools: list[dict]) -> dict:
    """The schema for tool_choice="required": a non-empty JSON array of {"name": ..., "parameters": {...}}.

    The tools' "$defs" move to the root, where their "#/$defs/..." references point.
    """
    variants: list[dict] = []
    definitions: dict[str, dict] = {}
    for tool in tools:
        parameters = dict(parameters_schema(tool))
        for key in _DEFINITION_KEYS:
            for def_name, definition in parameters.pop(key, {}).items():
                if definitions.setdefault(key, {}).setdefault(def_name, definition) != definition:
                    raise ValueError(f"tools define {key}/{def_name} differently; rename one of them")
        variants.append(
            {
                "properties": {"name": {"const": tool["function"]["name"]}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}, **definitions}


def parse_required_output(text: str) -> list[ToolCall]:
    """The calls in output generated under required_schema. ValueError if it is not such an array (the output was
    cut off, say)."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tool call output is not complete JSON: {e}") from None
    if not isinstance(calls, list) or not all(
        isinstance(call, dict) and isinstance(call.get("name"), str) and "parameters" in call for call in calls
    ):
        raise ValueError(f'tool call output is not a list of {{"name": ..., "parameters": ...}}: {text!r}')
    return [ToolCall(FunctionCall(call["name"], json.dumps(call["parameters"], ensure_ascii=False))) for call in calls]


def tools_system_prompt(tools: list[dict]) -> str:
    """The tool instructions of Qwen2.5's chat template, for templates that cannot render tools themselves.

    Goes after the system message (separated by a blank line), or is the system message when there is none.
    The model then answers in the hermes format.
    """
    signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{signatures}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
