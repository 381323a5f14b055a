"""Native C++ code built on first use: a source file next to its Python wrapper is compiled with the system
g++ (`-O3 -march=native -fopenmp`, no torch headers: plain C ABI called through ctypes; `-I` this folder, so a
source includes the shared headers as `#include "simd.h"`, `#include "amx.h"`) and cached in
`~/.cache/pagedserve/kernels`, keyed by the source, the compiler flags and this CPU's feature flags (it is built
for this CPU). The build takes about a second. Without a compiler, or with `PAGEDSERVE_NATIVE=0`, `load`
returns None and callers keep their PyTorch path. OpenMP is the libgomp the torch wheel already loaded (same
soname), so torch and these kernels share one thread pool.
"""

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger("pagedserve")

FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


HEADERS = Path(__file__).parent  # the shared headers, on the compiler's include path


def _header(source: Path, name: str) -> Path:
    """Where the compiler finds `#include "name"`: beside the source, else in HEADERS."""
    beside = source.parent / name
    return beside if beside.exists() else HEADERS / name


def _sources(source: Path) -> list[str]:
    """The source and the local headers it includes (`#include "..."`), whose text keys the cache."""
    text = source.read_text()
    headers = re.findall(r'^#include "([^"]+)"', text, re.MULTILINE)
    return [text, *(_header(source, header).read_text() for header in headers)]


def _build(source: Path, compiler: str) -> Path:
    key = hashlib.sha256(
        "\0".join([*_sources(source), compiler, *FLAGS, platform.machine(), cpu_flags()]).encode()
    ).hexdigest()[:16]
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pagedserve" / "kernels"
    library = cache_dir / f"{source.stem}-{key}.so"
    if not library.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # build aside, then rename: safe between processes
            built = Path(tmp) / library.name
            subprocess.run([compiler, *FLAGS, f"-I{HEADERS}", str(source), "-o", str(built)], check=True,
                           capture_output=True, text=True)
            built.replace(library)
    return library


Signature = tuple[type | None, Sequence[type]]  # (restype, argtypes) of an exported C function
KERNEL_PATHS = ("vnni", "portable", "torch")  # what PAGEDSERVE_GGUF_KERNEL / PAGEDSERVE_INT_KERNEL may force


def forced_path(variable: str) -> str | None:
    """The kernel path the environment variable forces (one of KERNEL_PATHS), or None when it is not set."""
    forced = os.environ.get(variable)
    if forced and forced not in KERNEL_PATHS:
        raise ValueError(f"{variable} must be one of {KERNEL_PATHS}, got {forced!r}")
    return forced or None


def batch_invariant() -> bool:
    """PAGEDSERVE_BATCH_INVARIANT=1 (or vLLM's VLLM_BATCH_INVARIANT=1): every quantized matmul runs its row-wise
    GEMV kernel whatever the number of rows, so a row's result, and a greedy token, is the same alone or in any
    batch. By default batches of more rows take faster kernels (AMX tiles, dequantize + matmul) whose reduction
    order differs from the GEMV's. Read on every call: the tests switch it."""
    return "1" in (os.environ.get("PAGEDSERVE_BATCH_INVARIANT"), os.environ.get("VLLM_BATCH_INVARIANT"))


def load(source: Path, what: str, functions: Mapping[str, Signature]) -> ctypes.CDLL | None:
    """The compiled library of `source` with the ctypes signatures of its `functions` (name -> (restype,
    argtypes)) declared, or None if `PAGEDSERVE_NATIVE=0`, or (with one warning naming what falls back) if it
    cannot be built here."""
    if os.environ.get("PAGEDSERVE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("no C++ compiler found: %s uses the PyTorch path", what)
        return None
    try:
        library = ctypes.CDLL(str(_build(source, compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = (getattr(error, "stderr", "") or str(error))[-2000:]
        logger.warning("building %s failed, using the PyTorch path: %s", source.name, detail)
        return None
    for name, (restype, argtypes) in functions.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, argtypes
    return library
