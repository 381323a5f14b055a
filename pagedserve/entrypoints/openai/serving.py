"""What /v1/completions and /v1/chat/completions share: text work off the event loop, admission before the
response starts, usage, and the SSE framing.

A request the engine would refuse now (its queue full, the engine down) is refused first, before any work on its
text. Then it is tokenized (and its chat template rendered) on one of a few worker threads, so a long prompt never
stalls the event loop nor the other clients' prompts; it is then admitted into the engine before any response byte
is sent, so a request refused at admission (bad input, a full queue, a dead engine) gets its real status (400, 503)
even when it streams.
Streaming responses are SSE: one `data: {json}` chunk per engine step that produced something, then
`data: [DONE]`. Leaving the stream early (the client went away) aborts the request in the engine.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from pagedserve.engine.protocol import AddRequest, validate_session
from pagedserve.frontend.engine_client import EngineClient
from pagedserve.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams

from .protocol import SamplingFields

T = TypeVar("T")

# Threads rendering chat templates and tokenizing, shared by the routes: a slow prompt holds one of them only
# (tokenizers release the GIL, so long prompts are also tokenized side by side).
TEXT_THREADS = 4


def text_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(TEXT_THREADS, thread_name_prefix="pagedserve-text")


class ContextLengthError(ValueError):
    """Prompt + max_tokens is over max_model_len (a 400 naming the numbers)."""


class EngineFault(RuntimeError):
    """The engine failed a request (a 500: not the client's fault)."""


@dataclass
class ServingOptions:
    model_name: str
    chat_template: str | None = None  # --chat-template; None: the tokenizer's
    trust_request_chat_template: bool = False  # a request's own chat_template is Jinja run by the server
    enable_prompt_tokens_details: bool = False  # cached_tokens tells whether a prompt was seen: off by default
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    responses_store: str | None = None  # --responses-store: a database URL; None: a SQLite file in the cache dir
    responses_ttl_s: float = 30 * 24 * 3600.0  # --responses-ttl: stored responses older than this are gone
    responses_max_stored: int = 100_000  # --responses-max-stored: past it, the oldest stored responses go
    server_address: str = "local"  # host:port; a server restarted there fails the background runs left behind


@dataclass
class Admitted:
    """A request's prompts, each admitted into the engine, with its output stream."""

    request_id: str
    prompts: list[dict]  # {"prompt": text or None, "prompt_token_ids": [...]}
    params: list[SamplingParams]
    streams: list[AsyncIterator[RequestOutput]]
    engine_ids: list[str]

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p["prompt_token_ids"]) for p in self.prompts]


@dataclass
class EventStream:
    """A streaming response's SSE events. `close` aborts its requests if they still run: the response calls it
    however it ends, also when the client left before the first event (the events are then never iterated, so no
    generator's `finally` would)."""

    events: AsyncIterator[str]
    close: Callable[[], None]


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_error(e: Exception) -> str:
    """The last event of a stream that failed after it started: the request's own input (a ValueError: 400), or the
    engine (it died, or failed the request: 500)."""
    if isinstance(e, ValueError):
        return sse({"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": 400}})
    return sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}})


def clamp(logprob: float) -> float:
    return max(logprob, -9999.0)  # JSON has no -inf


def prompt_logprobs_json(prompt_logprobs: PromptLogprobs | None, prompt_token_ids: list[int], k: int) -> list:
    """vLLM's `prompt_logprobs` field: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} for the prompt token and the top k."""
    return [None if entry is None else {
        str(token_id): {"logprob": clamp(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
        for token_id, lp in entry.items()
        if token_id == prompt_token_ids[position] or lp.rank is None or lp.rank <= k
    } for position, entry in enumerate(prompt_logprobs or [])]


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
    def __init__(self, engine: EngineClient, options: ServingOptions, text_executor: ThreadPoolExecutor) -> None:
        """`text_executor` (`text_executor()`): the threads that work on prompts' text, shared by the routes."""
        self.engine = engine
        self.options = options
        self.model_name = options.model_name
        self.max_model_len = engine.config.max_model_len
        self.text_executor = text_executor

    async def run_text(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.text_executor, fn, *args)

    def prepare(self, request: SamplingFields, prompts: list[dict], max_tokens: int | None, logprobs: int | None,
                structured_outputs: StructuredOutputsParams | None = None) -> list[tuple[dict, SamplingParams]]:
        """Tokenize and validate every prompt (on the text thread); ValueError (-> 400) before anything reaches
        the engine."""
        validate_session(request.session_id, request.kv_retention_s, request.priority)
        defaults = self.engine.config.generation_defaults
        prepared = []
        for prompt in prompts:
            text, token_ids = self.engine.input_processor.tokenize(prompt)
            room = self.max_model_len - len(token_ids)
            tokens = max_tokens if max_tokens is not None else max(1, min(room, int(defaults.get("max_tokens", room))))
            if len(token_ids) + tokens > self.max_model_len:
                raise ContextLengthError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                    f"{len(token_ids) + tokens} tokens ({len(token_ids)} in the prompt, {tokens} in the completion). "
                    "Please reduce the length of the prompt or completion."
                )
            params = request.sampling_params(tokens, logprobs, defaults, structured_outputs)
            self.engine.input_processor.validate(token_ids, params)  # the engine's own checks, as a 400
            prepared.append(({"prompt": text, "prompt_token_ids": token_ids}, params))
        return prepared

    def admit(self, prepared: list[tuple[dict, SamplingParams]], request_id: str, request: SamplingFields) -> Admitted:
        """Hand every prompt to the engine now; if one is refused, the ones already admitted are aborted."""
        admitted = Admitted(request_id, [p for p, _ in prepared], [sp for _, sp in prepared], [], [])
        try:
            for i, (prompt, params) in enumerate(prepared):
                engine_id = f"{request_id}-{i}" if len(prepared) > 1 else request_id
                admitted.streams.append(self.engine.add_request(AddRequest(
                    engine_id, prompt["prompt_token_ids"], params, request.cache_salt, request.session_id,
                    request.kv_retention_s, request.priority, prompt["prompt"])))
                admitted.engine_ids.append(engine_id)
        except BaseException:
            self.abort(admitted)
            raise
        return admitted

    def abort(self, admitted: Admitted) -> None:
        for engine_id in admitted.engine_ids:
            self.engine.abort(engine_id)

    @staticmethod
    def check(output: CompletionOutput) -> None:
        """A failed output: the client's error (a 400, e.g. a grammar that did not compile) or the engine's."""
        if output.finish_reason == "error":
            if output.error is not None:
                raise ValueError(output.error)
            raise EngineFault("the engine failed this request; see the server log")

    @staticmethod
    def token_ids(request: SamplingFields, output: RequestOutput, out: CompletionOutput) -> dict:
        if not request.return_token_ids:
            return {}
        return {"token_ids": out.token_ids, "prompt_token_ids": output.prompt_token_ids}

    def usage(self, prompt_lens: list[int], completion_tokens: int, cached_tokens: int) -> dict:
        prompt_tokens = sum(prompt_lens)
        usage: dict = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens}
        if self.options.enable_prompt_tokens_details:  # tells whether another tenant sent this prefix
            usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
        return usage
