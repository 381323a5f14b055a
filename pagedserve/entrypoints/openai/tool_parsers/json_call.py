"""Shared states for formats whose calls are JSON objects: {"name": "f", "arguments": {...}}.

The name is sent as soon as the object's header `{"name": "f", "arguments": ` is complete. The arguments object
then streams through verbatim: its text, exactly as the model wrote it, is the call's `arguments` in both modes,
and a BracketScanner only finds where it ends (no partial JSON is re-parsed).

Reading the header commits to the call. Text that does not open like a call (not JSON, another key first, a
non-string name, arguments that are not an object) is content. But arguments already streamed cannot be taken
back, so an arguments object that turns out malformed or cut off is kept as that call's `arguments` text, in both
modes; clients must validate arguments anyway, as with OpenAI.
"""

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from .base import ToolParser
from .scanning import BracketScanner, Cursor


@dataclass
class CallHeader:
    name: str
    length: int  # text up to the arguments object, or up to the closing brace when there are no arguments
    has_arguments: bool


def match_call_header(text: str, argument_keys: tuple[str, ...]) -> CallHeader | None:
    """Match `{"name": "f", "<argument key>": ` or `{"name": "f"}` (any JSON whitespace) at the start of text.

    The name must come first: every supported model writes it first, and it lets the name go out before the
    arguments stream. Returns None if text cannot open a call; raises NeedMore if it may but has ended.
    """
    cursor = Cursor(text)
    cursor.skip()
    if not (cursor.accept("{") and _key(cursor, ("name",))):
        return None
    name = cursor.json_string()
    if name is None:
        return None
    cursor.skip()
    if cursor.peek() == "}":
        return CallHeader(name, cursor.pos, has_arguments=False)
    if not (cursor.accept(",") and _key(cursor, argument_keys) and cursor.peek() == "{"):
        return None
    return CallHeader(name, cursor.pos, has_arguments=True)


def _key(cursor: Cursor, keys: tuple[str, ...]) -> bool:
    """Consume `"key":` for one of keys, and the whitespace around it."""
    cursor.skip()
    if not any(cursor.accept(f'"{key}"') for key in keys):
        return False
    cursor.skip()
    if not cursor.accept(":"):
        return False
    cursor.skip()
    return True


class JsonCallParser(ToolParser):
    """States `_call` -> `_arguments` -> `_call_end` (format-specific), or `_not_a_call` if there is no call."""

    argument_keys: ClassVar[tuple[str, ...]] = ("arguments",)

    def __init__(self, tools: list[dict]) -> None:
        super().__init__(tools)
        self._scanner = BracketScanner()

    def _call(self, final: bool) -> bool:
        """State: where a call object should start."""
        header = self._match(lambda text: match_call_header(text, self.argument_keys), final)
        if header is None:
            self._give_back()
            self._state = self._not_a_call
            return True
        self._take(header.length)
        if header.has_arguments:
            self._open_arguments(header.name)
        else:
            self._start_call(header.name)
            self._send_arguments("{}")
            self._scanner = BracketScanner(depth=1)
            self._state = self._call_end
        return True

    def _open_arguments(self, name: str) -> None:
        """Start a call whose arguments object is next in the buffer."""
        self._start_call(name)
        self._scanner = BracketScanner()
        self._state = self._arguments

    def _arguments(self, final: bool) -> bool:
        """State: inside the arguments object; everything up to its closing brace is sent as it comes."""
        end = self._scanner.scan(self._buf)
        self._send_arguments(self._take(len(self._buf) if end is None else end))
        if end is None:
            return False
        self._scanner = BracketScanner(depth=1)  # for the rest of the call object
        self._state = self._call_end
        return True

    def _close_object(self) -> bool:
        """Drop the rest of the call object (its closing brace, any extra keys); True once it is closed."""
        end = self._scanner.scan(self._buf)
        self._take(len(self._buf) if end is None else end)
        return end is not None

    @abstractmethod
    def _call_end(self, final: bool) -> bool:
        """State: after the arguments object, inside the call object."""

    @abstractmethod
    def _not_a_call(self, final: bool) -> bool:
        """State: what stood where a call should start was not one; its text has been given back as content."""
