"""/v1/completions: prompts (text or token ids, one or several) -> completions, whole or streamed."""

import functools
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, cast

from pagedserve.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput

from .protocol import CompletionRequest
from .serving import Admitted, EventStream, OpenAIServing, clamp, merge, prompt_logprobs_json, sse, sse_error


class CompletionServing(OpenAIServing):
    async def completions(self, request: CompletionRequest) -> Coroutine[Any, Any, dict] | EventStream:
        """Admit the request; return the coroutine of the whole response, or the SSE stream."""
        if request.suffix:
            raise ValueError("suffix is not supported")
        self.engine.check_admission()  # a full queue or a dead engine: refused before any work on the text
        structured = request.structured_outputs_params()
        max_tokens = 1 if request.echo_only else request.max_tokens  # one token is made, and not returned
        prepared = await self.run_text(self.prepare, request, request.prompts(), max_tokens, request.logprobs,
                                       structured)
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
                completion_tokens += len(out.token_ids)
                choices.append({"index": i * request.n + out.index, **self._choice(request, final, out, True),
                                **self._token_ids(request, final, out)})
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
        prompt_logprobs: dict[int, PromptLogprobs | None] = {}
        try:
            async for i, output in merge(admitted.streams):
                cached[i] = output.metrics.get("num_cached_tokens", 0)
                # the prompt's logprobs come in its first delta; each of its n samples echoes them first
                prompt_logprobs[i] = output.prompt_logprobs = output.prompt_logprobs or prompt_logprobs.get(i)
                choices = []
                for out in output.outputs:
                    self.check(out)
                    index = i * request.n + out.index
                    offset = text_offsets.get(index, 0)
                    choice = self._choice(request, output, out, index not in text_offsets, offset)
                    if request.echo_only and index in text_offsets:  # the prompt went out; the token made is not shown
                        choice["text"], choice["logprobs"] = "", None
                    text_offsets[index] = offset + len(choice["text"])
                    completion_tokens += len(out.token_ids)
                    choices.append({"index": index, **choice, **self._token_ids(request, output, out)})
                yield sse({**base, "choices": choices})
            if request.include_usage:
                yield sse({**base, "choices": [],
                           "usage": self.usage(admitted.prompt_lens, completion_tokens, sum(cached.values()))})
        except Exception as e:
            yield sse_error(e)
        finally:
            self.abort(admitted)
        yield "data: [DONE]\n\n"

    def _choice(self, request: CompletionRequest, output: RequestOutput, out: CompletionOutput, first: bool,
                offset: int = 0) -> dict:
        """A choice's text, logprobs (OpenAI's legacy shape) and finish; with echo, the first one of a prompt
        starts with the prompt (and its logprobs). echo with max_tokens 0 shows the prompt alone."""
        text, token_ids = out.text, out.token_ids
        logprobs: PromptLogprobs | None = list(out.logprobs) if out.logprobs is not None else None
        echo = request.echo and first
        if request.echo_only:
            text, token_ids, logprobs = "", [], [] if logprobs is not None else None
        if echo:
            text = self._prompt_text(output) + text
            token_ids = output.prompt_token_ids + token_ids
            if logprobs is not None:
                assert output.prompt_logprobs is not None  # asked for with echo + logprobs
                logprobs = output.prompt_logprobs + logprobs
        choice: dict[str, Any] = {"text": text, "logprobs": None, "finish_reason": out.finish_reason,
                                  "stop_reason": out.stop_reason}
        if request.logprobs is not None and logprobs is not None:
            choice["logprobs"] = self._logprobs(logprobs, token_ids, offset, request.logprobs)
        if request.prompt_logprobs is not None and first:
            choice["prompt_logprobs"] = prompt_logprobs_json(output.prompt_logprobs, output.prompt_token_ids,
                                                             request.prompt_logprobs)
        return choice

    def _token_ids(self, request: CompletionRequest, output: RequestOutput, out: CompletionOutput) -> dict:
        ids = self.token_ids(request, output, out)
        if ids and request.echo_only:  # the token made is not part of the answer
            ids["token_ids"] = []
        return ids

    def _prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return cast(str, self.engine.tokenizer.decode(output.prompt_token_ids))

    def _logprobs(self, logprobs: Sequence[dict[int, Logprob] | None], token_ids: list[int], offset: int,
                  k: int) -> dict:
        """OpenAI's legacy logprobs: per token its text, logprob, top k alternatives and text offset. A prompt's
        first token has no logprob (null), as in OpenAI's echo."""
        tokens: list[str | None] = []
        token_logprobs: list[float | None] = []
        top: list[dict | None] = []
        offsets = []
        for entry, token_id in zip(logprobs, token_ids):
            if entry is None:
                decoded = cast(str, self.engine.tokenizer.decode([token_id]))
                tokens.append(decoded)
                token_logprobs.append(None)
                top.append(None)
            else:
                chosen = entry[token_id]
                decoded = chosen.decoded_token or ""
                tokens.append(chosen.decoded_token)
                token_logprobs.append(clamp(chosen.logprob))
                top.append({lp.decoded_token: clamp(lp.logprob) for t, lp in entry.items()
                            if t == token_id or lp.rank is None or lp.rank <= k})
            offsets.append(offset)
            offset += len(decoded)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
