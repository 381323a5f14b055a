"""/v1/chat/completions: messages -> chat template -> completion, with OpenAI tool calling (tool_calling.py says
how each `tool_choice` is served)."""

import functools
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from pagedserve.outputs import CompletionOutput, Logprob

from .chat_prompt import render_chat_prompt
from .protocol import ChatCompletionRequest
from .serving import Admitted, EventStream, OpenAIServing, clamp, prompt_logprobs_json, sse, sse_error
from .tool_calling import ChoiceTools, ToolPlan, call_json, plan_tools


class ChatServing(OpenAIServing):
    async def chat(self, request: ChatCompletionRequest) -> Coroutine[Any, Any, dict] | EventStream:
        """Admit the request; return the coroutine of the whole response, or the SSE stream."""
        if request.chat_template is not None and not self.options.trust_request_chat_template:
            raise ValueError("chat_template in a request is refused: the server runs it as code. Start the server "
                             "with --trust-request-chat-template to allow it")
        self.engine.check_admission()  # a full queue or a dead engine: refused before any work on the text
        plan = plan_tools(request.tool_dicts or [], request.effective_tool_choice, request.parallel_tool_calls,
                          self.options.enable_auto_tool_choice, self.options.tool_call_parser)
        structured = plan.constrain(request.structured_outputs_params())
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

    # ---- the prompt -------------------------------------------------------------------------------

    def _render(self, request: ChatCompletionRequest, plan: ToolPlan) -> dict:
        """The chat template applied (on the text thread): {"prompt": text, "prompt_token_ids": ids}."""
        return render_chat_prompt(self.engine, [m.for_template() for m in request.messages], plan.tools,
                                  request.chat_template or self.options.chat_template,
                                  request.add_generation_prompt, request.continue_final_message)

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
                message["tool_calls"] = [call_json(call) for call in calls]
            choices.append({
                **self.token_ids(request, final, out),
                "index": out.index, "message": message,
                "logprobs": self._logprobs_field(request, out),
                "finish_reason": finish_reason, "stop_reason": out.stop_reason,
            })
        choices.sort(key=lambda c: c["index"])
        response = {"id": admitted.request_id, "object": "chat.completion", "created": int(time.time()),
                    "model": self.model_name, "choices": choices,
                    "usage": self.usage(admitted.prompt_lens, completion_tokens,
                                        final.metrics.get("num_cached_tokens", 0))}
        if request.prompt_logprobs is not None:
            response["prompt_logprobs"] = prompt_logprobs_json(final.prompt_logprobs, final.prompt_token_ids,
                                                               request.prompt_logprobs)
        return response

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
        return {"content": chat_logprobs(out.logprobs, out.token_ids, request.top_logprobs)}


def chat_logprobs(logprobs: list[dict[int, Logprob]], token_ids: list[int], num_top: int | None) -> list[dict]:
    def entry_for(lp: Logprob) -> dict:
        token = lp.decoded_token or ""
        return {"token": token, "logprob": clamp(lp.logprob), "bytes": list(token.encode())}

    content = []
    for entry, token_id in zip(logprobs, token_ids):
        top = sorted(entry.values(), key=lambda lp: lp.rank or 0)[: num_top or 0]
        content.append({**entry_for(entry[token_id]), "top_logprobs": [entry_for(lp) for lp in top]})
    return content
