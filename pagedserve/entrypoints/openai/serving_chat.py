"""/v1/chat/completions: messages -> chat template -> completion, with OpenAI tool calling.

How `tool_choice` is served:
- "none": tools are shown to the model (through the template), nothing is parsed.
- a named function: the output is constrained to that tool's parameters schema and is the call's arguments.
- "required": the output is constrained to a JSON array of {"name", "parameters"} over the tools (vLLM's shape).
- "auto" (needs --enable-auto-tool-choice and --tool-call-parser): the model writes text or calls in its own
  format, parsed by the model family's parser; where the format has one, a structural tag constrains whatever
  follows the call marker to the tools' schemas, so an auto call's arguments always validate.
The first three need no parser. A chat template that cannot render tools (the default model's) gets Qwen2.5's
hermes-style tool prompt instead, and past calls and tool results in that format.

An output cut by max_tokens finishes with "length" in every mode, never "tool_calls" (a call may be cut midway):
a named or auto call keeps the arguments generated so far, as vLLM; a required output that is not a complete
array comes back as content, with no calls.
"""

import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from pagedserve.outputs import CompletionOutput, Logprob
from pagedserve.sampling_params import StructuredOutputsParams

from .protocol import ChatCompletionRequest
from .serving import Admitted, EventStream, OpenAIServing, clamp, sse, sse_error
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


class ChoiceTools:
    """One choice's tool calls, whole or streamed. Named and required outputs are JSON the grammar shaped; an
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
        """Streaming: (content, OpenAI tool_call deltas) for the next piece of output text."""
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
            return content or "", [_call_delta(i, call) for i, call in enumerate(whole)]
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


class ChatServing(OpenAIServing):
    async def chat(self, request: ChatCompletionRequest) -> Coroutine[Any, Any, dict] | EventStream:
        """Admit the request; return the coroutine of the whole response, or the SSE stream."""
        if request.chat_template is not None and not self.options.trust_request_chat_template:
            raise ValueError("chat_template in a request is refused: the server runs it as code. Start the server "
                             "with --trust-request-chat-template to allow it")
        self.engine.check_admission()  # a full queue or a dead engine: refused before any work on the text
        plan = self._tool_plan(request)
        structured = request.structured_outputs_params()
        if plan.constraint is not None:
            if structured is not None and plan.mode != "auto":
                raise ValueError(f"tool_choice {plan.mode!r} constrains the output itself: it cannot be combined "
                                 "with response_format or structured_outputs")
            structured = structured or plan.constraint
        prompt = await self.run_text(self._render, request, plan)
        prepared = await self.run_text(self.prepare, request, [prompt], request.requested_max_tokens,
                                       request.num_logprobs, structured)
        if plan.parser is not None and plan.parser.keeps_special_tokens:
            for _, params in prepared:
                params.skip_special_tokens = False
        admitted = self.admit(prepared, f"chatcmpl-{uuid.uuid4().hex}", request)
        if request.stream:
            return EventStream(self._stream(request, admitted, plan), functools.partial(self.abort, admitted))
        return self._full(request, admitted, plan)

    def _tool_plan(self, request: ChatCompletionRequest) -> ToolPlan:
        tools = request.tool_dicts or []
        choice = request.effective_tool_choice
        if tools:
            validate_tools(tools)
        validate_tool_choice(choice, tools)
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            return ToolPlan("named", tools, named=name, constraint=StructuredOutputsParams(json=named_schema(tools,
                                                                                                            name)))
        if choice == "required":
            schema = required_schema(tools)
            if not request.parallel_tool_calls:
                schema["maxItems"] = 1
            return ToolPlan("required", tools, constraint=StructuredOutputsParams(json=schema))
        if choice == "auto":
            if not (self.options.enable_auto_tool_choice and self.options.tool_call_parser):
                raise ValueError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to '
                                 'be set (or give tool_choice "required", "none" or a named function)')
            parser = get_tool_parser(self.options.tool_call_parser)
            tag = parser.structural_tag(tools)
            constraint = StructuredOutputsParams(structural_tag=json.dumps(tag)) if tag is not None else None
            return ToolPlan("auto", tools, parser=parser, constraint=constraint)
        return ToolPlan("none", tools)

    # ---- the prompt -------------------------------------------------------------------------------

    def _render(self, request: ChatCompletionRequest, plan: ToolPlan) -> dict:
        """The chat template applied (on the text thread): {"prompt": text, "prompt_token_ids": ids}."""
        messages = [m.for_template() for m in request.messages]
        template = request.chat_template or self.options.chat_template
        tools: list[Any] | None = plan.tools or None
        uses_tools = tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if uses_tools and not self._template_renders_tools(template):
            messages, tools = hermes_messages(messages, plan.tools), None
        try:
            text = self.engine.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=template,
                add_generation_prompt=request.add_generation_prompt and not request.continue_final_message,
                continue_final_message=request.continue_final_message, tokenize=False,
            )
        except Exception as e:  # a template error (missing template, a message it cannot render) is the input's
            raise ValueError(f"the chat template could not render these messages: {e}") from e
        assert isinstance(text, str)
        return {"prompt": text, "prompt_token_ids": self.engine.input_processor.encode(text, add_special_tokens=False)}

    def _template_renders_tools(self, template: str | None) -> bool:
        source = template if template is not None else self.engine.tokenizer.chat_template
        if isinstance(source, dict):  # named templates: transformers picks "tool_use" when tools are given
            return "tool_use" in source or any("tools" in t for t in source.values())
        return source is not None and "tools" in source

    # ---- responses --------------------------------------------------------------------------------

    async def _full(self, request: ChatCompletionRequest, admitted: Admitted, plan: ToolPlan) -> dict:
        final = None
        try:
            async for output in admitted.streams[0]:
                final = output
        finally:
            self.abort(admitted)
        assert final is not None
        choices = []
        completion_tokens = 0
        for out in final.outputs:
            self.check(out)
            completion_tokens += len(out.token_ids)
            content, calls, finish_reason = ChoiceTools(plan, request.parallel_tool_calls).whole(
                out.text, out.finish_reason)
            message: dict = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [_call_json(call) for call in calls]
            choices.append({
                **self.token_ids(request, final, out),
                "index": out.index, "message": message,
                "logprobs": self._logprobs_field(request, out),
                "finish_reason": finish_reason, "stop_reason": out.stop_reason,
            })
        choices.sort(key=lambda c: c["index"])
        return {"id": admitted.request_id, "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": self.usage(admitted.prompt_lens, completion_tokens,
                                    final.metrics.get("num_cached_tokens", 0))}

    async def _stream(self, request: ChatCompletionRequest, admitted: Admitted, plan: ToolPlan) -> AsyncIterator[str]:
        base = {"id": admitted.request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_name}
        tools = [ChoiceTools(plan, request.parallel_tool_calls) for _ in range(request.n)]
        completion_tokens = cached = 0
        try:
            yield sse({**base, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(request.n)
            ]})
            async for output in admitted.streams[0]:
                cached = output.metrics.get("num_cached_tokens", 0)
                choices = []
                for out in output.outputs:
                    self.check(out)
                    completion_tokens += len(out.token_ids)
                    choice_tools = tools[out.index]
                    content, calls = choice_tools.delta(out.text, out.finished())
                    delta: dict = {}
                    if content:
                        delta["content"] = content
                    if calls:
                        delta["tool_calls"] = calls
                    choices.append({
                        **self.token_ids(request, output, out),
                        "index": out.index, "delta": delta,
                        "logprobs": self._logprobs_field(request, out) if out.token_ids else None,
                        "finish_reason": choice_tools.finish_reason(out.finish_reason), "stop_reason": out.stop_reason,
                    })
                yield sse({**base, "choices": choices})
            if request.include_usage:
                yield sse({**base, "choices": [], "usage": self.usage(admitted.prompt_lens, completion_tokens, cached)})
        except Exception as e:
            yield sse_error(e)
        finally:
            self.abort(admitted)
        yield "data: [DONE]\n\n"

    @staticmethod
    def _logprobs_field(request: ChatCompletionRequest, out: CompletionOutput) -> dict | None:
        if out.logprobs is None:
            return None
        return {"content": _chat_logprobs(out.logprobs, out.token_ids, request.top_logprobs)}


def _chat_logprobs(logprobs: list[dict[int, Logprob]], token_ids: list[int], num_top: int | None) -> list[dict]:
    def entry_for(lp: Logprob) -> dict:
        token = lp.decoded_token or ""
        return {"token": token, "logprob": clamp(lp.logprob), "bytes": list(token.encode())}

    content = []
    for entry, token_id in zip(logprobs, token_ids):
        top = sorted(entry.values(), key=lambda lp: lp.rank or 0)[: num_top or 0]
        content.append({**entry_for(entry[token_id]), "top_logprobs": [entry_for(lp) for lp in top]})
    return content


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


def _call_json(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": call.function.arguments}}


def _call_delta(index: int, call: ToolCall) -> dict:
    return {"index": index, **_call_json(call)}
