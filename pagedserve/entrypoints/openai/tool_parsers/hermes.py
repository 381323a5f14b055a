"""Hermes-style calls (Qwen2.5/Qwen3, Hermes, and models prompted with tools_system_prompt):

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Several calls may follow each other; text outside them is content.
"""

import json

from .base import structural_tag
from .json_call import JsonCallParser
from .scanning import find_marker

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(JsonCallParser):
    name = "hermes"

    def _start(self, final: bool) -> bool:
        """State: content, until a <tool_call> tag."""
        if self._scan_content((START,), final) is None:
            return False
        self._state = self._call
        return True

    def _call_end(self, final: bool) -> bool:
        """State: skip the rest of the call (normally `}\\n</tool_call>`) through its closing tag. A missing
        closing brace or tag is forgiven: the call also ends where the next <tool_call> starts."""
        pos, marker = find_marker(self._buf, (END, START))
        if marker is None:
            self._take(len(self._buf) if final else pos)
            return False
        self._take(pos + len(END) if marker == END else pos)
        self._end_call()
        self._state = self._start
        return True

    def _not_a_call(self, final: bool) -> bool:
        """State: the tag did not hold a call: its body is content too, through </tool_call>."""
        pos, marker = find_marker(self._buf, (END,))
        if marker is None:
            self._send_content(self._take(len(self._buf) if final else pos))
            return False
        self._send_content(self._take(pos + len(END)))
        self._state = self._start
        return True

    @classmethod
    def structural_tag(cls, tools: list[dict]) -> dict:
        return structural_tag(
            tools, lambda name: f'{START}\n{{"name": {json.dumps(name)}, "arguments": ', "}\n" + END, START
        )
