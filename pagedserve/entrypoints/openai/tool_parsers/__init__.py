"""Tool-call parsers: model output text -> OpenAI tool calls, whole or streamed; one parser per model family."""

from .base import ExtractedToolCalls, FunctionCall, StreamDelta, ToolCall, ToolCallDelta, ToolParser
from .hermes import HermesToolParser
from .llama3_json import Llama3JsonToolParser
from .mistral import MistralToolParser
from .pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}


def get_tool_parser(name: str) -> type[ToolParser]:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool parser {name!r}; valid names: {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]


__all__ = [
    "TOOL_PARSERS",
    "ExtractedToolCalls",
    "FunctionCall",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "get_tool_parser",
]
