"""BENCHMARKS.md is shared by several benchmarks: each one rewrites only its own named section, stamped with the
commit it measured."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_BENCHMARKS = os.path.join(REPO, "BENCHMARKS.md")
QUICK_WARNING = "**--quick run: sizes shrunk to check the script; do not quote these numbers.**"


def measured_commit(repo: str = REPO) -> str:
    """HEAD's short hash, with '+ uncommitted changes' when tracked files other than the benchmark report differ
    from it ('unknown' outside a git checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md",
                      ":!BENCHMARKS-*.png")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes" if changed else head


def replace_section(path: str, name: str, body: str, commit: str | None = None) -> None:
    """Put `body` and a line naming the commit it measured (`commit`, else `measured_commit()`) between
    `<!-- section: NAME -->` and `<!-- end: NAME -->` in `path`.

    The section is replaced in place when its markers are there, else appended; the rest of the file is
    left as it was. A missing file is created; a begin marker without its end marker is a ValueError. A --quick
    section is never written to the repository's own BENCHMARKS.md (it is printed; pass --output elsewhere).
    """
    if QUICK_WARNING in body and os.path.realpath(path) == os.path.realpath(REPO_BENCHMARKS):
        print(f"a --quick section is not written to {REPO_BENCHMARKS}: pass --output elsewhere", file=sys.stderr)
        return
    begin, end = f"<!-- section: {name} -->", f"<!-- end: {name} -->"
    stamp = f"Measured at commit `{commit or measured_commit()}`."
    block = f"{begin}\n{body.strip()}\n\n{stamp}\n{end}"
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
