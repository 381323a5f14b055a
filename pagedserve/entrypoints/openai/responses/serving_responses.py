"""/v1/responses: OpenAI's Responses API over the engine, with stored conversations and background runs.

A turn is rendered as chat would render the same conversation (chat_prompt.py, tool_calling.py): the
request's `instructions` as the system message, then the items of every earlier turn of its chain
(`previous_response_id`, read back from the store: their inputs and outputs, function calls and their
outputs included), then its own input. A chain is one engine session (its first response's id, unless the
request names a `session_id`), so the KV of a turn is kept for the next one without the client asking.

Every response is a `ResponseRun`: it drives the engine stream, builds the output items and the stream events
(events.py), and stores the result (`store: true`). Whole responses await it; streams follow its event log;
a background run is a task of its own that clients poll, stream (from any `starting_after`) or cancel. A
stopping server marks its unfinished background runs failed, and so does a server starting at the same
address for the runs a killed one left behind.
"""

import asyncio
import copy
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pagedserve.frontend.async_llm import EngineDeadError
from pagedserve.frontend.engine_client import EngineClient
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

from ..chat_prompt import render_chat_prompt
from ..serving import Admitted, EngineFault, OpenAIServing, ServingOptions
from ..serving_chat import chat_logprobs
from ..tool_calling import ChoiceTools, ToolPlan, plan_tools
from .events import EventLog, OutputBuilder
from .protocol import ResponsesRequest, chat_messages, new_id
from .store import IN_FLIGHT, ResponseNotFound, ResponseStore, StoredResponse

logger = logging.getLogger("pagedserve")
T = TypeVar("T")

RESTARTED = "the server restarted before this background response finished"
STOPPED = "the server stopped before this background response finished"
MAX_LIST_LIMIT = 100


class ResponsesServing(OpenAIServing):
    def __init__(self, engine: EngineClient, options: ServingOptions, text_executor: ThreadPoolExecutor) -> None:
        super().__init__(engine, options, text_executor)
        self.owner = options.server_address
        self.runs: dict[str, ResponseRun] = {}  # this server's background runs, until they end
        self.store: ResponseStore | None = None  # opened at the first use of /v1/responses
        self.store_lock = asyncio.Lock()
        # One thread: the store's calls block, and SQLite takes one writer at a time anyway.
        self.store_executor = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-store")

    async def run_store(self, method: Callable[..., T], *args: object) -> T:
        """`method(store, *args)` on the store's thread, the store being opened (created, migrated) first if
        this is its first use; then the background runs a killed server at this address left are failed."""
        loop = asyncio.get_running_loop()
        async with self.store_lock:
            if self.store is None:
                self.store = await loop.run_in_executor(self.store_executor, self._open_store)
        return await loop.run_in_executor(self.store_executor, method, self.store, *args)

    def _open_store(self) -> ResponseStore:
        options = self.options
        store = ResponseStore(options.responses_store, options.responses_ttl_s, options.responses_max_stored)
        failed = store.fail_in_flight(self.owner, RESTARTED)
        if failed:
            logger.warning("%d background responses left by the previous server at %s were marked failed",
                           failed, self.owner)
        return store

    async def shutdown(self) -> None:
        """Stop the background runs (marked failed: nothing will finish them) and close the store."""
        await asyncio.gather(*(run.stop(STOPPED) for run in list(self.runs.values())))
        if self.store is not None:
            self.store.close()
        self.store_executor.shutdown()

    # ---- POST /v1/responses -----------------------------------------------------------------------

    async def create(self, request: ResponsesRequest, tenant: str) -> Coroutine[Any, Any, dict] | AsyncIterator[str]:
        """Admit the request; return the coroutine of the whole response (or, in background, of the queued
        one), or the SSE stream."""
        self.engine.check_admission()  # a full queue or a dead engine: refused before any work on the text
        chain: list[StoredResponse] = []
        if request.previous_response_id is not None:
            chain = await self.run_store(ResponseStore.chain, request.previous_response_id, tenant)
        plan = plan_tools(request.chat_tools, request.chat_tool_choice, request.parallel_tool_calls,
                          self.options.enable_auto_tool_choice, self.options.tool_call_parser)
        output_format = request.output_format()
        # A named or required call is all the output: text.format, which shapes text messages, has none to shape.
        structured = plan.constraint if plan.mode in ("named", "required") else plan.constrain(output_format)
        response_id = new_id("resp")
        session_id = request.session_id or (chain[-1].session_id if chain else None)
        if session_id is None and request.store:
            session_id = response_id  # a chain starts here
        request = request.model_copy(update={"session_id": session_id})
        history = [item for turn in chain for item in turn.input_items + turn.response["output"]]
        input_items = request.input_items()
        prepared = await self.run_text(self._prepare_turn, request, plan, history + input_items, structured)
        params = prepared[0][1]
        if plan.parser is not None and plan.parser.keeps_special_tokens:
            params.skip_special_tokens = False
        if request.background:  # followed, polled or resumed while it runs
            params.output_kind = RequestOutputKind.DELTA
        admitted = self.admit(prepared, response_id, request)
        run = ResponseRun(self, request, admitted, plan, tenant, input_items)
        if not request.background:
            if request.stream:
                return self._follow(run, None, asyncio.create_task(run.execute()))
            return run.execute()
        try:
            await self.run_store(ResponseStore.put, run.record())
        except BaseException:
            self.abort(admitted)
            raise
        self.runs[run.id] = run
        run.task = asyncio.create_task(run.execute())
        if request.stream:
            return self._follow(run, None)
        return _ready(run.snapshot())

    def _prepare_turn(self, request: ResponsesRequest, plan: ToolPlan, items: list[dict],
                      structured: StructuredOutputsParams | None) -> list[tuple[dict, SamplingParams]]:
        """Render and tokenize the turn (on the text thread). With truncation "auto", the oldest messages are
        dropped until prompt + max_output_tokens fits the context; "disabled" leaves that to prepare's 400."""
        system = [{"role": "system", "content": request.instructions}] if request.instructions else []
        messages = chat_messages(items)
        room = request.max_output_tokens or 1
        while True:
            prompt = render_chat_prompt(self.engine, system + messages, plan.tools, self.options.chat_template)
            fits = len(prompt["prompt_token_ids"]) + room <= self.max_model_len
            if fits or request.truncation == "disabled" or len(messages) <= 1:
                break
            messages = messages[1:]
            while len(messages) > 1 and messages[0]["role"] == "tool":  # results whose calls were dropped
                messages = messages[1:]
        return self.prepare(request, [prompt], request.max_output_tokens, request.num_logprobs, structured)

    def _follow(self, run: "ResponseRun", starting_after: int | None,
                task: asyncio.Task | None = None) -> AsyncIterator[str]:
        """SSE of a run's events as they come. `task`: a run that ends with this stream (not a background one):
        if the client goes away first, it is cancelled."""

        async def events() -> AsyncIterator[dict]:
            try:
                async for event in run.log.follow(starting_after):
                    yield event
            finally:
                if task is not None and not run.log.finished:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

        return _sse(events())

    # ---- the other routes -------------------------------------------------------------------------

    async def retrieve(self, response_id: str, tenant: str, stream: bool,
                       starting_after: int | None) -> dict | AsyncIterator[str]:
        run = self._live(response_id, tenant)
        if run is not None:
            return self._follow(run, starting_after) if stream else run.snapshot()
        record = await self._get(response_id, tenant)
        if not stream:
            return record.response
        if record.events is None:
            if record.status in IN_FLIGHT:
                raise ValueError(f"response {response_id!r} is running on another server ({record.owner}): "
                                 "stream it there, or poll it")
            raise ValueError(f"response {response_id!r} was not created in background mode: only background "
                             "responses can be streamed again")
        return _sse(event for event in record.events
                    if starting_after is None or event["sequence_number"] > starting_after)

    async def cancel(self, response_id: str, tenant: str) -> dict:
        run = self._live(response_id, tenant)
        if run is not None:
            await run.cancel()
            return run.snapshot()
        record = await self._get(response_id, tenant)
        if not record.background:
            raise ValueError(f"response {response_id!r} was not created in background mode: only background "
                             "responses can be cancelled")
        if record.status in IN_FLIGHT:  # another server runs it: it will not overwrite the cancellation
            record.status, record.owner = "cancelled", None
            record.response = {**record.response, "status": "cancelled"}
            await self.run_store(ResponseStore.update_in_flight, record)
        return record.response

    async def delete(self, response_id: str, tenant: str) -> dict:
        run = self._live(response_id, tenant)
        if run is not None:
            await run.cancel()
        if not await self.run_store(ResponseStore.delete, response_id, tenant):
            raise ResponseNotFound(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def input_items(self, response_id: str, tenant: str, limit: int, order: str, after: str | None,
                          before: str | None) -> dict:
        """OpenAI's list shape, newest first unless `order` is "asc"; `after` / `before`: item id cursors."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
        if order not in ("asc", "desc"):
            raise ValueError(f'order must be "asc" or "desc", got {order!r}')
        record = await self._get(response_id, tenant)
        items = record.input_items if order == "asc" else record.input_items[::-1]
        ids = [item["id"] for item in items]
        for cursor, name in ((after, "after"), (before, "before")):
            if cursor is not None and cursor not in ids:
                raise ValueError(f"{name}: response {response_id!r} has no input item {cursor!r}")
        if before is not None:
            items = items[:ids.index(before)]
        if after is not None:
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    def _live(self, response_id: str, tenant: str) -> "ResponseRun | None":
        run = self.runs.get(response_id)
        return run if run is not None and run.tenant == tenant else None

    async def _get(self, response_id: str, tenant: str) -> StoredResponse:
        record = await self.run_store(ResponseStore.get, response_id, tenant)
        if record is None:
            raise ResponseNotFound(response_id)
        return record


class ResponseRun:
    """One response being generated: its engine stream -> output items and events -> the stored result."""

    def __init__(self, serving: ResponsesServing, request: ResponsesRequest, admitted: Admitted, plan: ToolPlan,
                 tenant: str, input_items: list[dict]) -> None:
        self.serving = serving
        self.request = request
        self.admitted = admitted
        self.id = admitted.request_id
        self.tenant = tenant
        self.input_items = input_items
        self.params = admitted.params[0]
        self.created_at = time.time()  # the store orders and expires by it; clients see whole seconds
        self.status = "queued" if request.background else "in_progress"
        self.error: dict | None = None
        self.incomplete_details: dict | None = None
        self.usage: dict | None = None
        self.completion_tokens = self.cached_tokens = 0
        self.log = EventLog()
        self.output = OutputBuilder(self.log, request.wants_logprobs)
        self.tools = ChoiceTools(plan, request.parallel_tool_calls)
        self.task: asyncio.Task | None = None  # a background run's
        self.ending: tuple[str, str | None] | None = None  # (status, error) a cancel or a stop asks for
        self.log.emit("response.created", response=self.snapshot())
        if not request.background:
            self.log.emit("response.in_progress", response=self.snapshot())

    def snapshot(self) -> dict:
        """The response object as it stands."""
        request = self.request
        text_format = request.text.format.model_dump(by_alias=True, exclude_none=True) if request.text else {
            "type": "text"}
        tool_choice = request.tool_choice or ("auto" if request.tools else "none")
        return {
            "id": self.id, "object": "response", "created_at": int(self.created_at), "status": self.status,
            "background": request.background, "error": self.error, "incomplete_details": self.incomplete_details,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "metadata": request.metadata or {}, "model": self.serving.model_name,
            "output": copy.deepcopy(self.output.items), "output_text": self.output.text,
            "parallel_tool_calls": request.parallel_tool_calls, "previous_response_id": request.previous_response_id,
            "store": request.store, "temperature": self.params.temperature, "top_p": self.params.top_p,
            "text": {"format": text_format},
            "tool_choice": tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or ()],
            "top_logprobs": request.top_logprobs, "truncation": request.truncation, "usage": self.usage,
            "user": request.user,
        }

    def record(self, *more_events: dict) -> StoredResponse:
        background = self.request.background
        return StoredResponse(
            self.id, self.tenant, self.created_at, self.status, background, self.input_items, self.snapshot(),
            self.request.previous_response_id, self.request.session_id,
            owner=self.serving.owner if background and self.status in IN_FLIGHT else None,
            events=[*self.log.events, *more_events] if background else None)

    async def execute(self) -> dict:
        """Run to a terminal state; store it (with `store`), then publish its terminal event, so a client that
        saw the end can chain from it at once. The final response object."""
        try:
            await self._generate()
        except asyncio.CancelledError:
            if self.ending is None:  # the client of a whole or streamed response went away: nothing to keep
                raise
            self.status, message = self.ending
            self.error = {"code": "server_error", "message": message} if message else None
            self.output.finish("incomplete", empty_message=False)
        except Exception as e:  # the engine failed or died: a failed response, never a broken stream
            if not isinstance(e, (EngineFault, EngineDeadError)):
                logger.exception("response %s failed", self.id)
            self.status, self.error = "failed", {"code": "server_error", "message": str(e)}
            self.output.finish("incomplete", empty_message=False)
        finally:
            self.serving.abort(self.admitted)
        self.usage = self._usage()
        terminal = self.log.number(f"response.{self.status}", response=self.snapshot())
        await self._save(terminal)
        self.log.publish(terminal)
        self.serving.runs.pop(self.id, None)
        return self.snapshot()

    async def cancel(self) -> None:
        await self._end("cancelled", None)

    async def stop(self, message: str) -> None:
        await self._end("failed", message)

    async def _end(self, status: str, message: str | None) -> None:
        if self.task is None or self.task.done():
            return
        self.ending = (status, message)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def _generate(self) -> None:
        finish_reason = None
        async for output in self.admitted.streams[0]:
            if self.status == "queued":
                self.status = "in_progress"
                self.log.emit("response.in_progress", response=self.snapshot())
                await self.serving.run_store(ResponseStore.update_in_flight, self.record())
            self._add(output)
            self.completion_tokens += sum(len(out.token_ids) for out in output.outputs)
            self.cached_tokens = output.metrics.get("num_cached_tokens", 0)
            finish_reason = output.outputs[0].finish_reason
        if finish_reason == "length":
            self.status, self.incomplete_details = "incomplete", {"reason": "max_output_tokens"}
        else:
            self.status = "completed"
        self.output.finish("incomplete" if self.status == "incomplete" else "completed")

    def _add(self, output: RequestOutput) -> None:
        for out in output.outputs:
            OpenAIServing.check(out)
            content, calls = self.tools.delta(out.text, out.finished())
            logprobs = None
            if out.logprobs is not None and content:
                logprobs = chat_logprobs(out.logprobs, out.token_ids, self.request.top_logprobs)
            self.output.add_text(content, logprobs)
            self.output.add_calls(calls)

    def _usage(self) -> dict:
        prompt_tokens, completion_tokens = sum(self.admitted.prompt_lens), self.completion_tokens
        # cached_tokens tells whether someone sent this prefix before: only with --enable-prompt-tokens-details
        cached = self.cached_tokens if self.serving.options.enable_prompt_tokens_details else 0
        return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt_tokens + completion_tokens}

    async def _save(self, terminal: dict) -> None:
        if not self.request.store:
            return
        save = ResponseStore.update_in_flight if self.request.background else ResponseStore.put
        try:
            await self.serving.run_store(save, self.record(terminal))
        except Exception:  # the response was given; a store that failed is the server log's news
            logger.exception("response %s could not be stored", self.id)


async def _ready(value: T) -> T:
    return value


async def _sse(events: AsyncIterator[dict] | Iterable[dict]) -> AsyncIterator[str]:
    if isinstance(events, AsyncIterator):
        async for event in events:
            yield _sse_event(event)
    else:
        for event in events:
            yield _sse_event(event)


def _sse_event(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
