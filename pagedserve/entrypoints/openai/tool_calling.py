"""OpenAI tool calling, shared by /v1/chat/completions and /v1/responses: how a request's `tools` and
`tool_choice` are served, and one output's calls, whole or streamed.

How `tool_choice` is served:
- "none": tools are shown to the model (through the template), nothing is parsed.
- a named function: the output is constrained to that tool's parameters schema and is the call's arguments.
- "required": the output is constrained to a JSON array of {"name", "parameters"} over the tools (vLLM's shape).
- "auto" (needs --enable-auto-tool-choice and --tool-call-parser): the model writes text or calls in its own
  format, parsed by the model family's parser; where the format has one, a structural tag constrains whatever
  follows the call marker to the tools' schemas, so an auto call's arguments always validate.
The first three need no parser. A chat template that cannot render tools (the default model's) gets Qwen2.5's
hermes-style tool prompt instead, and past calls and tool results in that format (`hermes_messages`).

An output cut by max_tokens finishes with "length" in every mode, never "tool_calls" (a call may be cut midway):
a named or auto call keeps the arguments generated so far, as vLLM; a required output that is not a complete
array comes back as content, with no calls.
"""

import json
from dataclasses import dataclass

from pagedserve.sampling_params import StructuredOutputsParams

from .tool_parsers import FunctionCall, ToolCall, ToolParser, get_tool_parser
from .tool_parsers.base import new_call_id
from .tool_parsers.tools import (
    named_schema,
    parse_required_output,
    required_schema,
    tools_system_prompt,
    validate_tool_choice,
    validate_tools,
)


@dataclass
class ToolPlan:
    """How this request's tools are served (see the module docstring)."""

    mode: str  # "none" | "named" | "required" | "auto"
    tools: list[dict]
    named: str | None = None
    parser: type[ToolParser] | None = None
    constraint: StructuredOutputsParams | None = None

    def constrain(self, structured: StructuredOutputsParams | None) -> StructuredOutputsParams | None:
        """The output constraint: the request's own (response_format, ...) or the plan's. Named and required
        calls are a constraint themselves, so they cannot take another (ValueError); an auto call's tag gives
        way to the request's format."""
        if self.constraint is None:
            return structured
        if structured is not None and self.mode != "auto":
            raise ValueError(f"tool_choice {self.mode!r} constrains the output itself: it cannot be combined "
                             "with response_format or structured_outputs")
        return structured or self.constraint


def plan_tools(tools: list[dict], choice: str | dict, parallel: bool, enable_auto_tool_choice: bool,
               tool_call_parser: str | None) -> ToolPlan:
    """`tools` in chat's shape ({"type": "function", "function": {...}}); `choice` "none", "auto", "required"
    or {"type": "function", "function": {"name": ...}}. ValueError (-> 400) for bad tools or choices."""
    if tools:
        validate_tools(tools)
    validate_tool_choice(choice, tools)
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return ToolPlan("named", tools, named=name, constraint=StructuredOutputsParams(json=named_schema(tools, name)))
    if choice == "required":
        schema = required_schema(tools)
        if not parallel:
            schema["maxItems"] = 1
        return ToolPlan("required", tools, constraint=StructuredOutputsParams(json=schema))
    if choice == "auto":
        if not (enable_auto_tool_choice and tool_call_parser):
            raise ValueError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to '
                             'be set (or give tool_choice "required", "none" or a named function)')
        parser = get_tool_parser(tool_call_parser)
        tag = parser.structural_tag(tools)
        constraint = StructuredOutputsParams(structural_tag=json.dumps(tag)) if tag is not None else None
        return ToolPlan("auto", tools, parser=parser, constraint=constraint)
    return ToolPlan("none", tools)


class ChoiceTools:
    """One output's tool calls, whole or streamed. Named and required outputs are JSON the grammar shaped; an
    auto output goes through the model family's parser."""

    def __init__(self, plan: ToolPlan, parallel: bool) -> None:
        self.plan = plan
        self.parallel = parallel
        self.parser = plan.parser(plan.tools) if plan.mode == "auto" and plan.parser is not None else None
        self.text = ""  # required mode: held until the end
        self.call_id: str | None = None  # named mode: the call being streamed
        self.num_calls = 0

    def whole(self, text: str, finish_reason: str | None) -> tuple[str | None, list[ToolCall], str | None]:
        """(content, tool calls, finish_reason) of a finished output."""
        mode = self.plan.mode
        if mode == "named":
            assert self.plan.named is not None
            return None, [ToolCall(FunctionCall(self.plan.named, text))], finish_reason
        if mode == "required":
            try:
                calls = parse_required_output(text)
            except ValueError:  # cut off before the grammar completed (max_tokens)
                return text, [], finish_reason
            return None, calls if self.parallel else calls[:1], _calls_finish(finish_reason)
        if self.parser is None:
            return text, [], finish_reason
        extracted = self.parser.extract(text)
        calls = extracted.tool_calls if self.parallel else extracted.tool_calls[:1]
        return extracted.content, calls, _calls_finish(finish_reason) if calls else finish_reason

    def delta(self, text: str, finished: bool) -> tuple[str, list[dict]]:
        """Streaming: (content, OpenAI tool_call deltas) for the next piece of output text. A call's first delta
        has its "id", "type" and "function.name"; later ones only more "function.arguments"."""
        mode = self.plan.mode
        if mode == "named":
            calls = []
            if self.call_id is None:
                self.call_id = new_call_id()
                calls.append({"index": 0, "id": self.call_id, "type": "function",
                              "function": {"name": self.plan.named, "arguments": text}})
            elif text:
                calls.append({"index": 0, "function": {"arguments": text}})
            self.num_calls = 1
            return "", calls
        if mode == "required":
            self.text += text
            if not finished:
                return "", []
            content, whole, _ = self.whole(self.text, None)
            self.num_calls = len(whole)
            return content or "", [call_delta(i, call) for i, call in enumerate(whole)]
        if self.parser is None:
            return text, []
        pieces = [self.parser.feed(text)] + ([self.parser.finish()] if finished else [])
        content, calls = "", []
        for piece in pieces:
            content += piece.content
            for call in piece.tool_calls:
                if call.index > 0 and not self.parallel:
                    continue
                delta: dict = {"index": call.index, "function": {"arguments": call.arguments}}
                if call.id is not None:
                    delta.update(id=call.id, type="function")
                    delta["function"]["name"] = call.name
                    self.num_calls += 1
                calls.append(delta)
        return content, calls

    def finish_reason(self, engine_reason: str | None) -> str | None:
        if engine_reason is None or self.plan.mode in ("none", "named"):
            return engine_reason
        return _calls_finish(engine_reason) if self.num_calls else engine_reason


def _calls_finish(engine_reason: str | None) -> str | None:
    """The finish_reason of an output that holds calls: "tool_calls", unless max_tokens cut it ("length")."""
    return engine_reason if engine_reason == "length" else "tool_calls"


def hermes_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Messages for a template with no tools section, in the hermes format the tools prompt teaches: the
    prompt in the system message, past calls as <tool_call> blocks, tool results as <tool_response> blocks in
    a user turn (consecutive results share one), as Qwen2.5's template renders them."""
    out: list[dict] = []
    if tools:
        prompt = tools_system_prompt(tools)
        if messages and messages[0]["role"] == "system":
            out.append({**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": prompt})
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            blocks = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                 ensure_ascii=False) for c in message["tool_calls"]]
            text = "\n".join(f"<tool_call>\n{block}\n</tool_call>" for block in blocks)
            content = f"{message['content']}\n{text}" if message.get("content") else text
            out.append({"role": "assistant", "content": content})
        elif message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += f"\n{block}"
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        else:
            out.append(message)
    for message in out:
        message.pop("tool_results", None)
    return out


def call_json(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": call.function.arguments}}


def call_delta(index: int, call: ToolCall) -> dict:
    return {"index": index, **call_json(call)}
