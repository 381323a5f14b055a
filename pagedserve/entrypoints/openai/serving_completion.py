"""/v1/completions: prompts (text or token ids, one or several) -> completions, whole or streamed."""

import functools
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any, cast

from pagedserve.outputs import Logprob, RequestOutput

from .protocol import CompletionRequest
from .serving import Admitted, EventStream, OpenAIServing, clamp, merge, sse, sse_error


class CompletionServing(OpenAIServing):
    async def completions(self, request: CompletionRequest) -> Coroutine[Any, Any, dict] | EventStream:
        """Admit the request; return the coroutine of the whole response, or the SSE stream."""
        if request.echo and request.logprobs is not None:
            raise ValueError("echo with logprobs needs prompt logprobs, which are not supported yet")
        if request.suffix:
            raise ValueError("suffix is not supported")
        self.engine.check_admission()  # a full queue or a dead engine: refused before any work on the text
        structured = request.structured_outputs_params()
        prepared = await self.run_text(self.prepare, request, request.prompts(), request.max_tokens,
                                       request.logprobs, structured)
        admitted = self.admit(prepared, f"cmpl-{uuid.uuid4().hex}", request)
        if request.stream:
            return EventStream(self._stream(request, admitted), functools.partial(self.abort, admitted))
        return self._full(request, admitted)

    async def _full(self, request: CompletionRequest, admitted: Admitted) -> dict:
        finals: list[RequestOutput | None] = [None] * len(admitted.streams)
        try:
            async for i, output in merge(admitted.streams):
                finals[i] = output
        finally:
            self.abort(admitted)  # no-op for finished requests; frees the others if we were cancelled
        choices = []
        completion_tokens = cached = 0
        for i, final in enumerate(finals):
            assert final is not None
            cached += final.metrics.get("num_cached_tokens", 0)
            for out in final.outputs:
                self.check(out)
                text = self._prompt_text(final) + out.text if request.echo else out.text
                completion_tokens += len(out.token_ids)
                choices.append({
                    "index": i * request.n + out.index, "text": text,
                    "logprobs": self._logprobs(out.logprobs, out.token_ids, 0) if out.logprobs else None,
                    "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                    **self.token_ids(request, final, out),
                })
        choices.sort(key=lambda c: c["index"])
        return {"id": admitted.request_id, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": self.usage(admitted.prompt_lens, completion_tokens, cached)}

    async def _stream(self, request: CompletionRequest, admitted: Admitted) -> AsyncIterator[str]:
        base = {"id": admitted.request_id, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        completion_tokens = 0
        cached: dict[int, int] = {}
        text_offsets: dict[int, int] = {}
        try:
            async for i, output in merge(admitted.streams):
                cached[i] = output.metrics.get("num_cached_tokens", 0)
                choices = []
                for out in output.outputs:
                    self.check(out)
                    index = i * request.n + out.index
                    text = out.text
                    if request.echo and index not in text_offsets:
                        text = self._prompt_text(output) + text
                    offset = text_offsets.get(index, 0)
                    text_offsets[index] = offset + len(text)
                    completion_tokens += len(out.token_ids)
                    choices.append({
                        "index": index, "text": text,
                        "logprobs": self._logprobs(out.logprobs, out.token_ids, offset) if out.logprobs else None,
                        "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                        **self.token_ids(request, output, out),
                    })
                yield sse({**base, "choices": choices})
            if request.include_usage:
                yield sse({**base, "choices": [],
                           "usage": self.usage(admitted.prompt_lens, completion_tokens, sum(cached.values()))})
        except Exception as e:
            yield sse_error(e)
        finally:
            self.abort(admitted)
        yield "data: [DONE]\n\n"

    def _prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return cast(str, self.engine.tokenizer.decode(output.prompt_token_ids))

    @staticmethod
    def _logprobs(logprobs: list[dict[int, Logprob]], token_ids: list[int], offset: int) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for entry, token_id in zip(logprobs, token_ids):
            chosen = entry[token_id]
            tokens.append(chosen.decoded_token)
            token_logprobs.append(clamp(chosen.logprob))
            top.append({lp.decoded_token: clamp(lp.logprob) for lp in entry.values()})
            offsets.append(offset)
            offset += len(chosen.decoded_token or "")
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
