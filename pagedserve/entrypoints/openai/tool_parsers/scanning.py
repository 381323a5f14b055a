"""Small incremental scanners the parsers are built from.

They answer questions about model output that may still grow: "is a marker here?", "where does this JSON object
end?", "does a call start here?". When the text ends too early to answer, they raise NeedMore (or hold the
undecided tail back) instead of guessing, so no answer depends on how the output was split into chunks.
"""

import json
import re
from dataclasses import dataclass

JSON_SPACE = " \t\r\n"
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


class NeedMore(Exception):
    """The text ends before the question can be answered: wait for more output."""


class Cursor:
    """Reads a text from its start; running off its end raises NeedMore."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        if self.pos == len(self.text):
            raise NeedMore
        return self.text[self.pos]

    def skip(self, chars: str = JSON_SPACE) -> str:
        """Consume a run of `chars` and return it (NeedMore if the text ends inside the run: it may go on)."""
        start = self.pos
        while self.peek() in chars:
            self.pos += 1
        return self.text[start : self.pos]

    def accept(self, literal: str) -> bool:
        """Consume `literal` if the text continues with it."""
        chunk = self.text[self.pos : self.pos + len(literal)]
        if chunk == literal:
            self.pos += len(literal)
            return True
        if literal.startswith(chunk):  # the text ends part-way through literal
            raise NeedMore
        return False

    def json_string(self) -> str | None:
        """Consume a JSON string and return its value; None if there is no valid string here."""
        if self.peek() != '"':
            return None
        match = _JSON_STRING.match(self.text, self.pos)
        if match is None:  # no closing quote yet
            raise NeedMore
        try:
            value = json.loads(match.group())
        except ValueError:  # a raw control character or a bad escape
            return None
        self.pos = match.end()
        return value


def first_non_space(text: str) -> int:
    """Position of the first non-whitespace character (NeedMore if there is none yet)."""
    cursor = Cursor(text)
    cursor.skip()
    return cursor.pos


def find_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """The first complete marker in text as (position, marker).

    Without one: (position from which the end of text could still be the start of a marker, None); the caller
    holds that tail back until more text shows what it is.
    """
    found = [(pos, marker) for marker in markers if (pos := text.find(marker)) >= 0]
    if found:
        return min(found)
    for start in range(max(0, len(text) - max(map(len, markers)) + 1), len(text)):
        if any(marker.startswith(text[start:]) for marker in markers):
            return start, None
    return len(text), None


@dataclass
class BracketScanner:
    """Finds where a JSON object or array ends while its text streams in.

    It tracks only string/escape state and bracket depth: each character is looked at once and nothing is
    re-parsed. It does not validate; the text between the brackets is passed on exactly as the model wrote it.
    """

    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def scan(self, text: str) -> int | None:
        """Advance over text; return the index just past the bracket that closes the value, or None."""
        for i, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None
