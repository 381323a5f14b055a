"""Pythonic tool calls (Llama 3.2, Llama 4): the output is a Python list of calls with keyword arguments,

    [get_weather(city="San Francisco", unit="celsius"), get_time()]

optionally wrapped in <|python_start|> ... <|python_end|>. Output that does not open (after whitespace) with
one of those, followed by a call, is plain content. Each call is parsed with `ast` once its closing parenthesis
arrives and sent whole, its arguments as json.dumps of the keyword values. Values must be literals (strings,
numbers, True/False/None or true/false/null, lists, dicts). Anything else where a call should be ends the
calls: it and the rest of the output are content.
"""

import ast
import json
import string
from dataclasses import dataclass

from .base import ToolParser
from .scanning import Cursor, NeedMore

START, END = "<|python_start|>", "<|python_end|>"
_NAME_CHARS = string.ascii_letters + string.digits + "_"
_JSON_NAMES = {"true": True, "false": False, "null": None}


@dataclass
class _Call:
    name: str
    arguments: str
    length: int


def _list_start(text: str) -> int | None:
    """Length of the whitespace, optional <|python_start|> and `[` opening the calls; None if they do not open."""
    cursor = Cursor(text)
    cursor.skip()
    if cursor.accept(START):
        cursor.skip()
    if not cursor.accept("["):
        return None
    return cursor.pos  # just past the `[`


def _list_end(text: str) -> int | None:
    """Length of the whitespace and <|python_end|> after the list; None if there is no <|python_end|>."""
    cursor = Cursor(text)
    cursor.skip()
    return cursor.pos if cursor.accept(END) else None


def _closing_paren(text: str, pos: int) -> int:
    """Index just past the `)` matching an `(` before pos, skipping Python string literals."""
    depth, quote = 1, ""
    while pos < len(text):
        char = text[pos]
        if quote:
            if char == "\\":
                pos += 2
                continue
            if text.startswith(quote, pos):
                pos += len(quote)
                quote = ""
                continue
        elif char in "'\"":
            quote = char * 3 if text.startswith(char * 3, pos) else char
            pos += len(quote)
            continue
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    raise NeedMore


def _literal(node: ast.expr) -> object:
    """The value of a literal expression; ValueError for anything else (names, calls, operators)."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        result = {}
        for key_node, value in zip(node.keys, node.values):
            key = None if key_node is None else _literal(key_node)
            if key_node is None or isinstance(key, (list, dict)):
                raise ValueError("dict keys must be strings, numbers, booleans or null")
            result[key] = _literal(value)
        return result
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand)
        if isinstance(operand, (int, float)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
    raise ValueError(f"not a literal: {ast.dump(node)}")


def _parse_call(text: str) -> _Call | None:
    """Match `name(key=value, ...)` after whitespace at the start of text.

    Until the call's `)` arrives this rescans it on every piece of output; calls are short enough for that.
    """
    cursor = Cursor(text)
    cursor.skip()
    start = cursor.pos
    name = cursor.skip(_NAME_CHARS)
    if not name.isidentifier() or not cursor.accept("("):
        return None
    end = _closing_paren(text, cursor.pos)
    try:
        call = ast.parse(text[start:end], mode="eval").body
        if not isinstance(call, ast.Call) or call.args or any(keyword.arg is None for keyword in call.keywords):
            return None  # e.g. f(1), f(*a), f(**kw): no argument names to send
        arguments = {keyword.arg: _literal(keyword.value) for keyword in call.keywords}
        return _Call(name, json.dumps(arguments, ensure_ascii=False, allow_nan=False), end)
    except (SyntaxError, ValueError, RecursionError):
        return None


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def _start(self, final: bool) -> bool:
        """State: the start of the output decides whether it holds calls."""
        length = self._match(_list_start, final)
        if length is None:
            self._state = self._content
        else:
            self._hold(length)
            self._state = self._call
        return True

    def _call(self, final: bool) -> bool:
        """State: where a call should start; it is sent whole once complete."""
        call = self._match(_parse_call, final)
        if call is None:
            self._give_back()
            self._state = self._content
            return True
        self._take(call.length)
        self._start_call(call.name)
        self._send_arguments(call.arguments)
        self._end_call()
        self._state = self._separator
        return True

    def _separator(self, final: bool) -> bool:
        """State: after a call: `,` and the next call, or `]`."""
        return self._after_list_item(final, self._call, self._list_closed, self._content)

    def _list_closed(self, final: bool) -> bool:
        """State: after `]`: drop a <|python_end|>; anything else is content."""
        length = self._match(_list_end, final)
        if length is not None:
            self._take(length)
        self._state = self._content
        return True

    def _content(self, final: bool) -> bool:
        """State: the rest of the output is content."""
        self._send_content(self._take(len(self._buf)))
        return False

    @classmethod
    def structural_tag(cls, tools: list[dict]) -> None:
        """None: calls are Python syntax, which a JSON schema cannot describe."""
        return None
