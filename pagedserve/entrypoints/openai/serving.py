"""/v1/completions and /v1/chat/completions: requests -> engine prompts and params -> OpenAI responses.

Streaming responses are SSE: one `data: {json}` chunk per engine step that produced something, then
`data: [DONE]`. Leaving the stream early (the client went away) aborts the request in the engine.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from pagedserve.frontend.async_llm import AsyncLLM
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.sampling_params import SamplingParams

from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields


class ContextLengthError(ValueError):
    """Prompt + max_tokens is over max_model_len (a 400 naming the numbers)."""


class EngineFault(RuntimeError):
    """The engine failed a request (a 500: not the client's fault)."""


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _clamp(logprob: float) -> float:
    return max(logprob, -9999.0)  # JSON has no -inf


async def merge(iterators: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the request's position."""
    queue: asyncio.Queue = asyncio.Queue()

    async def drain(i: int, iterator: AsyncIterator[RequestOutput]) -> None:
        try:
            async for item in iterator:
                await queue.put((i, item))
        except Exception as e:
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, model_name: str, chat_template: str | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.chat_template = chat_template
        self.max_model_len = engine.config.max_model_len

    # ---- shared ---------------------------------------------------------------------------------

    def _prepare(self, request: SamplingFields, prompts: list[dict], max_tokens: int | None,
                 logprobs: int | None) -> list[tuple[dict, SamplingParams]]:
        """Tokenize and validate every prompt; ValueError (-> 400) before anything reaches the engine."""
        prepared = []
        for prompt in prompts:
            text, token_ids = self.engine.input_processor.tokenize(prompt)
            tokens = max_tokens if max_tokens is not None else max(1, self.max_model_len - len(token_ids))
            if len(token_ids) + tokens > self.max_model_len:
                raise ContextLengthError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                    f"{len(token_ids) + tokens} tokens ({len(token_ids)} in the prompt, {tokens} in the completion). "
                    "Please reduce the length of the prompt or completion."
                )
            engine_prompt = {"prompt": text, "prompt_token_ids": token_ids}
            params = request.sampling_params(tokens, logprobs)
            self.engine.input_processor(engine_prompt, params)  # the engine's own checks, as a 400
            prepared.append((engine_prompt, params))
        return prepared

    def _generators(self, prepared: list[tuple[dict, SamplingParams]], request_id: str,
                    cache_salt: str | None) -> list[AsyncIterator[RequestOutput]]:
        return [
            self.engine.generate(prompt, params, f"{request_id}-{i}" if len(prepared) > 1 else request_id, cache_salt)
            for i, (prompt, params) in enumerate(prepared)
        ]

    @staticmethod
    def _check(output: CompletionOutput) -> None:
        if output.finish_reason == "error":
            raise EngineFault("the engine failed this request; see the server log")

    @staticmethod
    def _token_ids(request: SamplingFields, output: RequestOutput, out: CompletionOutput) -> dict:
        if not request.return_token_ids:
            return {}
        return {"token_ids": out.token_ids, "prompt_token_ids": output.prompt_token_ids}

    @staticmethod
    def _usage(prompt_lens: list[int], completion_tokens: int, cached_tokens: int) -> dict:
        prompt_tokens = sum(prompt_lens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens}}

    # ---- /v1/completions --------------------------------------------------------------------------

    def completions(self, request: CompletionRequest) -> dict | AsyncIterator[str]:
        if request.echo and request.logprobs is not None:
            raise ValueError("echo with logprobs needs prompt logprobs, which are not supported yet")
        if request.suffix:
            raise ValueError("suffix is not supported")
        prepared = self._prepare(request, request.prompts(), request.max_tokens, request.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        generators = self._generators(prepared, request_id, request.cache_salt)
        if request.stream:
            return self._completion_stream(request, prepared, generators, request_id)
        return self._completion_full(request, prepared, generators, request_id)

    async def _completion_full(self, request: CompletionRequest, prepared, generators, request_id: str) -> dict:
        finals: list[RequestOutput | None] = [None] * len(generators)
        async for i, output in merge(generators):
            finals[i] = output
        choices = []
        completion_tokens = cached = 0
        for i, final in enumerate(finals):
            cached += final.metrics.get("num_cached_tokens", 0)
            for out in final.outputs:
                self._check(out)
                text = self._prompt_text(final) + out.text if request.echo else out.text
                completion_tokens += len(out.token_ids)
                choices.append({
                    "index": i * request.n + out.index, "text": text,
                    "logprobs": self._completion_logprobs(out.logprobs, out.token_ids, 0) if out.logprobs else None,
                    "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                    **self._token_ids(request, final, out),
                })
        choices.sort(key=lambda c: c["index"])
        return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices,
                "usage": self._usage([len(p["prompt_token_ids"]) for p, _ in prepared], completion_tokens, cached)}

    async def _completion_stream(self, request: CompletionRequest, prepared, generators,
                                 request_id: str) -> AsyncIterator[str]:
        created = int(time.time())
        completion_tokens = 0
        cached: dict[int, int] = {}
        text_offsets: dict[int, int] = {}
        try:
            async for i, output in merge(generators):
                cached[i] = output.metrics.get("num_cached_tokens", 0)
                choices = []
                for out in output.outputs:
                    self._check(out)
                    index = i * request.n + out.index
                    text = out.text
                    if request.echo and index not in text_offsets:
                        text = self._prompt_text(output) + text
                    offset = text_offsets.get(index, 0)
                    text_offsets[index] = offset + len(text)
                    completion_tokens += len(out.token_ids)
                    choices.append({
                        "index": index, "text": text,
                        "logprobs": self._completion_logprobs(out.logprobs, out.token_ids, offset)
                        if out.logprobs else None,
                        "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                        **self._token_ids(request, output, out),
                    })
                yield _sse({"id": request_id, "object": "text_completion", "created": created,
                            "model": self.model_name, "choices": choices})
            if request.include_usage:
                usage = self._usage([len(p["prompt_token_ids"]) for p, _ in prepared], completion_tokens,
                                    sum(cached.values()))
                yield _sse({"id": request_id, "object": "text_completion", "created": created,
                            "model": self.model_name, "choices": [], "usage": usage})
        except (ValueError, RuntimeError) as e:
            yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}})
        yield "data: [DONE]\n\n"

    def _prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.engine.tokenizer.decode(output.prompt_token_ids)

    @staticmethod
    def _completion_logprobs(logprobs: list[dict[int, Logprob]], token_ids: list[int], offset: int) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for entry, token_id in zip(logprobs, token_ids):
            chosen = entry[token_id]
            tokens.append(chosen.decoded_token)
            token_logprobs.append(_clamp(chosen.logprob))
            top.append({lp.decoded_token: _clamp(lp.logprob) for lp in entry.values()})
            offsets.append(offset)
            offset += len(chosen.decoded_token or "")
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    # ---- /v1/chat/completions ---------------------------------------------------------------------

    def chat(self, request: ChatCompletionRequest) -> dict | AsyncIterator[str]:
        messages = [m.for_template() for m in request.messages]
        try:
            text = self.engine.tokenizer.apply_chat_template(
                messages, tools=request.tools, chat_template=request.chat_template or self.chat_template,
                add_generation_prompt=request.add_generation_prompt and not request.continue_final_message,
                continue_final_message=request.continue_final_message, tokenize=False,
            )
        except Exception as e:  # a template error (missing template, a message it cannot render) is the input's
            raise ValueError(f"the chat template could not render these messages: {e}") from e
        token_ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        prepared = self._prepare(request, [{"prompt": text, "prompt_token_ids": token_ids}],
                                 request.requested_max_tokens, request.num_logprobs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        (generator,) = self._generators(prepared, request_id, request.cache_salt)
        if request.stream:
            return self._chat_stream(request, prepared, generator, request_id)
        return self._chat_full(request, prepared, generator, request_id)

    async def _chat_full(self, request: ChatCompletionRequest, prepared, generator, request_id: str) -> dict:
        final = None
        async for output in generator:
            final = output
        choices = []
        completion_tokens = 0
        for out in final.outputs:
            self._check(out)
            completion_tokens += len(out.token_ids)
            choices.append({
                **self._token_ids(request, final, out),
                "index": out.index, "message": {"role": "assistant", "content": out.text},
                "logprobs": {"content": self._chat_logprobs(out.logprobs, out.token_ids, request.top_logprobs)}
                if out.logprobs is not None else None,
                "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
            })
        choices.sort(key=lambda c: c["index"])
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices,
                "usage": self._usage([len(prepared[0][0]["prompt_token_ids"])], completion_tokens,
                                     final.metrics.get("num_cached_tokens", 0))}

    async def _chat_stream(self, request: ChatCompletionRequest, prepared, generator,
                           request_id: str) -> AsyncIterator[str]:
        created = int(time.time())
        base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        completion_tokens = cached = 0
        try:
            yield _sse({**base, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(request.n)
            ]})
            async for output in generator:
                cached = output.metrics.get("num_cached_tokens", 0)
                choices = []
                for out in output.outputs:
                    self._check(out)
                    completion_tokens += len(out.token_ids)
                    choices.append({
                        **self._token_ids(request, output, out),
                        "index": out.index, "delta": {"content": out.text} if out.text else {},
                        "logprobs": {"content": self._chat_logprobs(out.logprobs, out.token_ids, request.top_logprobs)}
                        if out.logprobs is not None and out.token_ids else None,
                        "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                    })
                yield _sse({**base, "choices": choices})
            if request.include_usage:
                usage = self._usage([len(prepared[0][0]["prompt_token_ids"])], completion_tokens, cached)
                yield _sse({**base, "choices": [], "usage": usage})
        except (ValueError, RuntimeError) as e:
            yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}})
        yield "data: [DONE]\n\n"

    @staticmethod
    def _chat_logprobs(logprobs: list[dict[int, Logprob]], token_ids: list[int], num_top: int | None) -> list[dict]:
        def entry_for(lp: Logprob) -> dict:
            token = lp.decoded_token or ""
            return {"token": token, "logprob": _clamp(lp.logprob), "bytes": list(token.encode())}

        content = []
        for entry, token_id in zip(logprobs, token_ids):
            top = sorted(entry.values(), key=lambda lp: lp.rank)[: num_top or 0]
            content.append({**entry_for(entry[token_id]), "top_logprobs": [entry_for(lp) for lp in top]})
        return content
