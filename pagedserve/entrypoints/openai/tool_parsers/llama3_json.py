"""Llama 3.1/3.2 JSON tool calls: the whole output is calls, optionally after <|python_tag|>, joined by `;`:

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

Output that does not open (after whitespace) with `{` or <|python_tag|> is plain content, and so is an output
whose first object is not a call (a JSON answer such as {"answer": 42}).
"""

import json

from .base import structural_tag
from .json_call import JsonCallParser
from .scanning import Cursor

PYTHON_TAG = "<|python_tag|>"


def _call_follows(text: str, prefix: str) -> int | None:
    """Length of the whitespace and optional `prefix` before a `{`; None if no `{` follows."""
    cursor = Cursor(text)
    cursor.skip()
    if cursor.accept(prefix):
        cursor.skip()
    return cursor.pos if cursor.peek() == "{" else None


class Llama3JsonToolParser(JsonCallParser):
    name = "llama3_json"
    argument_keys = ("parameters", "arguments")

    def _start(self, final: bool) -> bool:
        """State: the start of the output decides whether it holds calls."""
        return self._next_call(self._match(lambda text: _call_follows(text, PYTHON_TAG), final))

    def _call_end(self, final: bool) -> bool:
        if not self._close_object():
            return False
        self._end_call()
        self._state = self._separator
        return True

    def _separator(self, final: bool) -> bool:
        """State: after a call: `;` and the next call, or the end of the calls."""
        return self._next_call(self._match(lambda text: _call_follows(text, ";"), final))

    def _next_call(self, length: int | None) -> bool:
        if length is None:
            self._give_back()
            self._state = self._not_a_call
        else:
            self._hold(length)
            self._state = self._call
        return True

    def _not_a_call(self, final: bool) -> bool:
        """State: the rest of the output is content."""
        self._send_content(self._take(len(self._buf)))
        return False

    @classmethod
    def structural_tag(cls, tools: list[dict]) -> dict:
        return structural_tag(tools, lambda name: f'{{"name": {json.dumps(name)}, "parameters": ', "}", '{"name": ')
