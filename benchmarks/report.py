"""BENCHMARKS.md is shared by several benchmarks: each one rewrites only its own named section."""

from __future__ import annotations

import os


def replace_section(path: str, name: str, body: str) -> None:
    """Put `body` between `<!-- section: NAME -->` and `<!-- end: NAME -->` in `path`.

    The section is replaced in place when its markers are there, else appended; the rest of the file is
    left as it was. A missing file is created; a begin marker without its end marker is a ValueError.
    """
    begin, end = f"<!-- section: {name} -->", f"<!-- end: {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    start = text.find(begin)
    if start >= 0:
        stop = text.find(end, start)
        if stop < 0:
            raise ValueError(f"{path}: '{begin}' has no '{end}' after it")
        text = text[:start] + block + text[stop + len(end):]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
