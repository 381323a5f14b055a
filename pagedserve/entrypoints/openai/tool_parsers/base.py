"""The interface every tool parser implements, and the streaming machinery they share.

A parser is a small state machine over the model output. `feed` appends text to a buffer and lets the current
state consume the prefix it can decide on; text it cannot decide on yet (the start of a marker, an unfinished
call header) stays in the buffer until more arrives. `extract` runs a fresh machine over the whole text, so a
finished output and the same output streamed in any chunks give the same content and calls.
"""

import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from .scanning import NeedMore, find_marker, first_non_space

T = TypeVar("T")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class FunctionCall:
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass
class ToolCall:
    function: FunctionCall
    id: str = field(default_factory=new_call_id)
    type: str = "function"


@dataclass
class ExtractedToolCalls:
    tool_calls: list[ToolCall]
    content: str | None  # text outside tool calls (None if empty)


@dataclass
class ToolCallDelta:
    index: int  # position of the call in this response (0, 1, ...)
    id: str | None = None  # only on the first delta of a call
    name: str | None = None  # only on the first delta of a call
    arguments: str = ""  # the next piece of the arguments JSON text


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def parameters_schema(tool: dict) -> dict:
    """The JSON schema a tool's arguments must match; a tool without parameters takes an empty object."""
    return tool["function"].get("parameters") or {"type": "object"}


def structural_tag(tools: list[dict], begin: Callable[[str], str], end: str, trigger: str) -> dict:
    """vLLM's structural tag: once the model writes `trigger`, it must go on with one tool's `begin(name)`,
    arguments matching that tool's schema, and `end`."""
    structures = [
        {"begin": begin(tool["function"]["name"]), "schema": parameters_schema(tool), "end": end} for tool in tools
    ]
    return {"type": "structural_tag", "structures": structures, "triggers": [trigger]}


class ToolParser(ABC):
    """Turns one choice's output text into content and OpenAI tool calls, whole or streamed.

    One object per request choice: streaming state lives on it. A call naming a tool that is not in `tools` is
    still returned as a call; the server decides what to do with it (the model did try to call a tool, and
    turning that into prose would hide the mistake).
    """

    name: ClassVar[str]
    # True when the call markers are special tokens the detokenizer must keep (mistral's [TOOL_CALLS]).
    keeps_special_tokens: ClassVar[bool] = False

    def __init__(self, tools: list[dict]) -> None:
        self.tools = tools
        self._buf = ""  # output received but not decided on yet
        self._opening = ""  # consumed text that is content after all if no call follows (a marker, a separator)
        self._after_call = False  # whitespace right after a call is dropped, like whitespace before one
        self._calls = 0  # calls started so far
        self._out = StreamDelta()
        self._state: Callable[[bool], bool] = self._start

    def extract(self, text: str) -> ExtractedToolCalls:
        """Parse a whole finished output."""
        parser = type(self)(self.tools)
        deltas = [parser.feed(text), parser.finish()]
        calls: dict[int, ToolCall] = {}
        for delta in deltas:
            for piece in delta.tool_calls:
                if piece.name is not None:
                    calls[piece.index] = ToolCall(FunctionCall(piece.name, ""), id=piece.id or new_call_id())
                calls[piece.index].function.arguments += piece.arguments
        content = "".join(delta.content for delta in deltas)
        return ExtractedToolCalls(list(calls.values()), content or None)

    def feed(self, delta_text: str) -> StreamDelta:
        """Streaming: take the next piece of output; return what can be sent now."""
        self._buf += delta_text
        return self._run(final=False)

    def finish(self) -> StreamDelta:
        """End of output: decide on everything held back."""
        return self._run(final=True)

    @classmethod
    def structural_tag(cls, tools: list[dict]) -> dict | None:
        """A structural tag that makes an auto tool call schema-valid, or None if the format cannot have one."""
        return None

    # ---- the state machine ----------------------------------------------------------------------

    @abstractmethod
    def _start(self, final: bool) -> bool:
        """The first state. A state consumes what it can decide on from the buffer and returns True to run the
        next state, or False to wait for more text; when `final`, it must decide on everything."""

    def _run(self, final: bool) -> StreamDelta:
        try:
            while self._state(final):
                pass
        except NeedMore:  # a matcher needs more text (never raised when final, see _match)
            pass
        out, self._out = self._out, StreamDelta()
        return out

    def _match(self, matcher: Callable[[str], T | None], final: bool) -> T | None:
        """Run a matcher on the buffer. If the buffer ends before it can tell, wait for more text; at the end of
        the output that means no match."""
        try:
            return matcher(self._buf)
        except NeedMore:
            if final:
                return None
            raise

    def _take(self, n: int) -> str:
        text, self._buf = self._buf[:n], self._buf[n:]
        return text

    def _hold(self, n: int) -> None:
        """Consume text that opens a call: dropped if the call follows, given back as content if not."""
        self._opening += self._take(n)

    def _give_back(self) -> None:
        self._send_content(self._opening)
        self._opening = ""

    def _scan_content(self, markers: tuple[str, ...], final: bool) -> str | None:
        """Send content up to the first marker and hold the marker; return it, or None if none is in sight.

        Whitespace before a marker is held with it, and so is an end of the buffer that may be the start of one.
        """
        pos, marker = find_marker(self._buf, markers)
        if marker is None and final:
            self._send_content(self._take(len(self._buf)))
            return None
        content = self._buf[:pos].rstrip()
        self._send_content(self._take(len(content)))
        if marker is None:
            return None
        self._hold(pos - len(content) + len(marker))
        return marker

    def _after_list_item(
        self, final: bool, next_call: Callable[[bool], bool], closed: Callable[[bool], bool],
        otherwise: Callable[[bool], bool],
    ) -> bool:
        """State after a call in a list of calls: `,` goes on to `next_call`, `]` to `closed`, anything else
        means the list is not calls after all (`otherwise`, with what was held given back as content)."""
        pos = self._match(first_non_space, final)
        char = "" if pos is None else self._buf[pos]
        if pos is not None and char == ",":
            self._hold(pos + 1)
            self._state = next_call
        elif pos is not None and char == "]":
            self._take(pos + 1)
            self._state = closed
        else:
            self._give_back()
            self._state = otherwise
        return True

    def _send_content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        self._out.content += text

    def _start_call(self, name: str) -> None:
        self._opening = ""
        self._out.tool_calls.append(ToolCallDelta(self._calls, id=new_call_id(), name=name))
        self._calls += 1

    def _send_arguments(self, piece: str) -> None:
        if not piece:
            return
        last = self._out.tool_calls[-1] if self._out.tool_calls else None
        if last is not None and last.index == self._calls - 1:
            last.arguments += piece
        else:
            self._out.tool_calls.append(ToolCallDelta(self._calls - 1, arguments=piece))

    def _end_call(self) -> None:
        self._after_call = True
