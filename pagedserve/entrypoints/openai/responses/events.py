"""The Responses API's semantic stream events: a numbered log of them (`EventLog`, which streams follow, and a
background response keeps so a client can resume its stream), and `OutputBuilder`, which turns the model's output
(text and tool-call deltas, as `ChoiceTools` gives them) into output items, emitting the events on the way:

    response.created, response.in_progress
      response.output_item.added (message)        response.output_item.added (function_call)
        response.content_part.added                 response.function_call_arguments.delta ...
        response.output_text.delta ...              response.function_call_arguments.done
        response.output_text.done                 response.output_item.done
        response.content_part.done
      response.output_item.done
    response.completed | response.incomplete | response.failed | response.cancelled
"""

import asyncio
import copy
from collections.abc import AsyncIterator

from .protocol import function_call_item, message_item, new_id, output_text

TERMINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed", "response.cancelled")


class EventLog:
    """A response's events, numbered (`sequence_number` from 0), for `follow`ers who may join late."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.next_number = 0
        self.finished = False
        self._changed = asyncio.Event()

    def emit(self, kind: str, **fields: object) -> dict:
        return self.publish(self.number(kind, **fields))

    def number(self, kind: str, **fields: object) -> dict:
        """The next event, not yet published (a terminal event waits until the response is stored)."""
        event = {"type": kind, "sequence_number": self.next_number, **fields}
        self.next_number += 1
        return event

    def publish(self, event: dict) -> dict:
        self.events.append(event)
        self.finished = event["type"] in TERMINAL_EVENTS
        self._changed.set()
        self._changed = asyncio.Event()
        return event

    async def follow(self, starting_after: int | None) -> AsyncIterator[dict]:
        """The events after `starting_after`, then each new one until the terminal event."""
        position = 0 if starting_after is None else starting_after + 1
        while True:
            changed = self._changed
            while position < len(self.events):
                yield self.events[position]
                position += 1
            if self.finished:
                return
            await changed.wait()


class OutputBuilder:
    """The output items of one response, built from content and tool-call deltas (see the module docstring).
    Text goes to the open message item (one is opened when text comes); a call's first delta closes it and
    opens a function_call item."""

    def __init__(self, log: EventLog, with_logprobs: bool) -> None:
        self.log = log
        self.with_logprobs = with_logprobs
        self.items: list[dict] = []
        self.message: dict | None = None  # the open message item
        self.call: dict | None = None  # the open function_call item
        self.calls_by_index: dict[int, dict] = {}
        self.output_index: dict[str, int] = {}  # item id -> its place in the output

    @property
    def text(self) -> str:
        """OpenAI's `output_text`: the text of every output_text part."""
        return "".join(part["text"] for item in self.items if item["type"] == "message" for part in item["content"])

    def add_text(self, text: str, logprobs: list[dict] | None) -> None:
        if not text:
            return
        self._close_call()
        if self.message is None:
            self._open_message()
        assert self.message is not None
        part = self.message["content"][0]
        part["text"] += text
        if logprobs is not None:
            part["logprobs"].extend(logprobs)
        self._emit_for(self.message, "response.output_text.delta", content_index=0, delta=text,
                       logprobs=logprobs or [])

    def add_calls(self, deltas: list[dict]) -> None:
        """Chat-shaped tool_call deltas (ChoiceTools.delta)."""
        for delta in deltas:
            arguments = delta["function"].get("arguments") or ""
            if "id" in delta:
                self._close_message("completed")
                self._close_call()
                self.call = function_call_item(new_id("fc"), delta["id"], delta["function"]["name"], "",
                                               status="in_progress")
                self.calls_by_index[delta["index"]] = self.call
                self._open(self.call)
            call = self.calls_by_index[delta["index"]]
            if arguments:
                call["arguments"] += arguments
                self._emit_for(call, "response.function_call_arguments.delta", delta=arguments)

    def finish(self, status: str, empty_message: bool = True) -> None:
        """Close what is open: `status` is the message's ("completed", or "incomplete" when cut off). With
        `empty_message`, an output with no item at all gets an empty message, so there is an `output_text`."""
        if not self.items and empty_message:
            self._open_message()
        self._close_message(status)
        self._close_call()

    # ---- events -----------------------------------------------------------------------------------

    def _open(self, item: dict) -> None:
        self.output_index[item["id"]] = len(self.items)
        self.items.append(item)
        self.log.emit("response.output_item.added", output_index=len(self.items) - 1, item=copy.deepcopy(item))

    def _open_message(self) -> None:
        self.message = message_item(new_id("msg"), "assistant", [], status="in_progress")
        self._open(self.message)
        part = output_text("", [] if self.with_logprobs else None)
        self.message["content"].append(part)
        self._emit_for(self.message, "response.content_part.added", content_index=0, part=copy.deepcopy(part))

    def _close_message(self, status: str) -> None:
        message, self.message = self.message, None
        if message is None:
            return
        part = message["content"][0]
        self._emit_for(message, "response.output_text.done", content_index=0, text=part["text"],
                       logprobs=part.get("logprobs") or [])
        self._emit_for(message, "response.content_part.done", content_index=0, part=copy.deepcopy(part))
        message["status"] = status
        self.log.emit("response.output_item.done", output_index=self.output_index[message["id"]],
                      item=copy.deepcopy(message))

    def _close_call(self) -> None:
        call, self.call = self.call, None
        if call is None:
            return
        self._emit_for(call, "response.function_call_arguments.done", arguments=call["arguments"], name=call["name"])
        call["status"] = "completed"
        self.log.emit("response.output_item.done", output_index=self.output_index[call["id"]],
                      item=copy.deepcopy(call))

    def _emit_for(self, item: dict, kind: str, **fields: object) -> None:
        self.log.emit(kind, item_id=item["id"], output_index=self.output_index[item["id"]], **fields)

