"""Mistral tool calls, after optional content, in either of two forms:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

The second is what tokenizers v11+ produce ([ARGS] may be missing from decoded text; a `{` after the name is
enough). [TOOL_CALLS] is a special token, so the detokenizer must keep special tokens for this parser.
"""

import string

from .json_call import JsonCallParser
from .scanning import Cursor

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME_CHARS = string.ascii_letters + string.digits + "_-."


def _named_header(text: str) -> tuple[str, int] | None:
    """Match `name[ARGS]` up to the arguments object; (name, length) or None."""
    cursor = Cursor(text)
    cursor.skip()
    name = cursor.skip(_NAME_CHARS)
    if not name:
        return None
    cursor.accept(ARGS)
    return (name, cursor.pos) if cursor.peek() == "{" else None


def _list_start(text: str) -> int | None:
    """Length of the whitespace and `[` opening a JSON list of calls; None if no list opens here."""
    cursor = Cursor(text)
    cursor.skip()
    if not cursor.accept("["):
        return None
    return cursor.pos  # just past the `[`


class MistralToolParser(JsonCallParser):
    name = "mistral"
    keeps_special_tokens = True

    def __init__(self, tools: list[dict]) -> None:
        super().__init__(tools)
        self._in_list = False  # which form the current call is in

    def _start(self, final: bool) -> bool:
        """State: content, until [TOOL_CALLS]."""
        if self._scan_content((MARKER,), final) is None:
            return False
        self._state = self._opened
        return True

    _not_a_call = _start  # what follows the marker is content, up to the next marker

    def _opened(self, final: bool) -> bool:
        """State: after [TOOL_CALLS], a JSON list of calls or a call in the `name[ARGS]{...}` form."""
        length = self._match(_list_start, final)
        self._in_list = length is not None
        if length is not None:
            self._hold(length)
            self._state = self._call
            return True
        header = self._match(_named_header, final)
        if header is None:
            self._give_back()
            self._state = self._not_a_call
            return True
        name, length = header
        self._take(length)
        self._open_arguments(name)
        return True

    def _call_end(self, final: bool) -> bool:
        if self._in_list and not self._close_object():
            return False
        self._end_call()
        self._state = self._list_separator if self._in_list else self._start
        return True

    def _list_separator(self, final: bool) -> bool:
        """State: after a call in the list: `,` and the next call, or `]`."""
        return self._after_list_item(final, self._call, self._start, self._not_a_call)

    @classmethod
    def structural_tag(cls, tools: list[dict]) -> None:
        """None: calls open with the special token [TOOL_CALLS], while a structural tag's triggers are plain text
        (and the model may write either call form)."""
        return None
