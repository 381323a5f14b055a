"""Shared pieces of the benchmarks: machine description, hardware ceilings, model cost, Markdown tables."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from report import QUICK_WARNING

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def log(message: str) -> None:
    """A progress line on stderr, so stdout carries only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def ram_gib() -> float:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def machine_description() -> list[tuple[str, str]]:
    import transformers

    flags = cpu_flags()
    matrix_units = sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512f", "avx2"))
    return [
        ("Date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("CPU", cpu_model()),
        ("Logical cores", str(os.cpu_count())),
        ("CPU features", ", ".join(matrix_units) or "-"),
        ("RAM", f"{ram_gib():.1f} GiB"),
        ("Python", platform.python_version()),
        ("Load average at start (1, 5, 15 min)", ", ".join(_read("/proc/loadavg").split()[:3]) or "-"),
        ("torch", f"{torch.__version__}, {torch.get_num_threads()} intra-op thread(s)"),
        ("transformers", transformers.__version__),
    ]


# ----------------------------------------------------------------------------------------------------------
# Hardware ceilings
# ----------------------------------------------------------------------------------------------------------


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of one n x n x n `torch.mm` (2 n^3 FLOPs), best of `repeats`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b, out=out), repeats)


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s from a large tensor copy: bytes read + bytes written per second."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_time(lambda: dst.copy_(src), repeats)


# ----------------------------------------------------------------------------------------------------------
# What the model costs per token
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCost:
    """Parameter counts of a Llama-style decoder, and the FLOPs / bytes that follow from them."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_params: int  # one decoder layer's matrices and norms
    final_norm_params: int
    embedding_params: int
    lm_head_params: int  # counted even when tied: the head is a full matmul every step

    @classmethod
    def from_config(cls, config) -> ModelCost:
        hidden, inter = config.hidden_size, config.intermediate_size
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o, k, v
        mlp = 3 * hidden * inter  # gate, up, down
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            layer_params=attn + mlp + 2 * hidden,
            final_norm_params=hidden,
            embedding_params=config.vocab_size * hidden,
            lm_head_params=config.vocab_size * hidden,
        )

    @property
    def body_params(self) -> int:
        """Parameters every token passes through (all layers and the final norm; not the embedding row)."""
        return self.num_layers * self.layer_params + self.final_norm_params

    @property
    def stored_params(self) -> int:
        """Distinct parameters (the tied head shares the embedding)."""
        return self.body_params + self.embedding_params

    def attention_flops(self, context: float) -> float:
        """QK^T and PV for one query token over `context` keys, all layers."""
        return 4 * self.num_layers * self.num_heads * self.head_dim * context

    def flops_per_token(self, context: float) -> float:
        """One decoded token: 2 x (body + lm_head parameters) + attention at `context`."""
        return 2 * (self.body_params + self.lm_head_params) + self.attention_flops(context)

    def weight_bytes(self, itemsize: int) -> int:
        """Bytes of weights a decode step reads: every layer, the final norm and the (tied) head once."""
        return (self.body_params + self.lm_head_params) * itemsize

    def kv_bytes(self, context: float, itemsize: int) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * context * itemsize

    def decode_bytes_per_token(self, context: float, itemsize: int) -> float:
        """Single-stream decode: all weights once per step plus the K/V of the context."""
        return self.weight_bytes(itemsize) + self.kv_bytes(context, itemsize)

    def request_flops(self, prompt_len: int, output_len: int) -> float:
        """Useful FLOPs of one whole request: prefill + decode, logits only where a token is sampled."""
        fed = prompt_len + output_len - 1  # the last sampled token is never fed back
        attention = self.attention_flops(1) * fed * (fed + 1) / 2  # token p attends to p + 1 keys
        return 2 * self.body_params * fed + 2 * self.lm_head_params * output_len + attention


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------




def section_intro(script: str, quick: bool, minutes: float, description: str,
                  machine: list[tuple[str, str]]) -> list[str]:
    """A section's opening lines: the command that wrote it and how long it took, what it measures, a warning
    for a --quick run, and the machine."""
    return [
        f"Generated by `python benchmarks/{script}{' --quick' if quick else ''}` in {minutes:.1f} min. {description}",
        "", *([QUICK_WARNING, ""] if quick else []), markdown_table(["machine", ""], machine), "",
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def pct(part: float | None, whole: float | None) -> str:
    return "-" if part is None or not whole else f"{100 * part / whole:.0f}%"


def verdict(met: bool) -> str:
    """A goal's mark in a goals table."""
    return "met" if met else "**not met**"


def median_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float | None:
    """The median of the per-round ratios ours / theirs (rounds paired in order); None if either was not run."""
    ratios = [a / b for a, b in zip(ours, theirs) if b]
    return statistics.median(ratios) if ratios else None


# ----------------------------------------------------------------------------------------------------------
# Load on the machine
# ----------------------------------------------------------------------------------------------------------


def load_1min() -> float:
    """The 1-minute load average (nan where /proc/loadavg cannot be read)."""
    fields = _read("/proc/loadavg").split()
    return float(fields[0]) if fields else float("nan")


# Others may use this much CPU (in cores, averaged over a measurement) before it is marked as measured under load.
QUIET_OTHER_CORES = 0.2
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _processes() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command name, CPU seconds used so far), for every process readable in /proc."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if not stat:
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()  # from field 3 (state) on
        table[int(entry)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS)
    return table


def _descendants(table: dict[int, tuple[int, str, float]], root: int) -> set[int]:
    mine, added = {root}, True
    while added:
        added = False
        for pid, (ppid, _, _) in table.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                added = True
    return mine


@dataclass
class MachineLoad:
    """What the rest of the machine did during a measurement: the benchmark's own processes (this one and its
    children: servers, engine processes, workers) are left out, so it measures other work, not ourselves."""

    load_1min: float  # at the start, for the record (it counts the benchmark itself too)
    other_cores: float  # CPU used by other processes, in cores, averaged over the measurement
    busiest: list[tuple[str, float]]  # the busiest other processes: (command, cores)

    @property
    def quiet(self) -> bool:
        return self.other_cores < QUIET_OTHER_CORES

    def label(self) -> str:
        """"load 0.93, others 0.02 cores", with the busiest others and a bold mark when it was not quiet."""
        text = f"load {self.load_1min:.2f}, others {self.other_cores:.2f} cores"
        if not self.quiet:
            text += " (" + ", ".join(f"{name} {cores:.2f}" for name, cores in self.busiest) + ") **under load**"
        return text


class OtherLoadMeter:
    """Measure the CPU that processes outside this benchmark use between `start()` and `stop()`."""

    def start(self) -> OtherLoadMeter:
        self.load_1min = load_1min()
        self.t0 = time.monotonic()
        self.before = _processes()
        return self

    def stop(self) -> MachineLoad:
        after = _processes()
        elapsed = max(time.monotonic() - self.t0, 1e-3)
        mine = _descendants(after, os.getpid()) | _descendants(self.before, os.getpid())
        used = {}
        for pid, (_, name, cpu) in after.items():
            if pid not in mine:
                used[pid] = (name, (cpu - (self.before[pid][2] if pid in self.before else 0.0)) / elapsed)
        busiest = sorted(used.values(), key=lambda x: -x[1])[:3]
        return MachineLoad(self.load_1min, sum(cores for _, cores in used.values()),
                           [(name, cores) for name, cores in busiest if cores >= 0.01])


def wait_for_quiet(max_wait_s: float, window_s: float = 2.0) -> MachineLoad:
    """Wait, at most `max_wait_s`, until other processes use less than QUIET_OTHER_CORES over a `window_s`
    window; the last window's reading (`.quiet` says whether the wait succeeded)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        meter = OtherLoadMeter().start()
        time.sleep(window_s)
        reading = meter.stop()
        if reading.quiet or time.monotonic() >= deadline:
            return reading
        log(f"machine busy ({reading.label()}): waiting, at most {deadline - time.monotonic():.0f} s more")
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
