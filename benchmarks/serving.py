"""Serving benchmark: `pagedserve serve` on the default model, swept by `pagedserve bench serve`, once per
placement of the engine loop (a thread of the server, or its own process).

    python benchmarks/serving.py [--output BENCHMARKS.md] [--quick]

Writes the `serving` section of the output file (the rest of it is left alone) and a PNG chart next to it.
The server helpers here (`ServerProcess`, `run_sweep`, `plot_sweeps`) are shared with `peers.py` and
`multi_turn.py`. --quick shrinks the sweep to check the script, not to quote its numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from common import (
    QUICK_WARNING,
    QUIET_OTHER_CORES,
    OtherLoadMeter,
    log,
    machine_description,
    markdown_table,
    wait_for_quiet,
)
from report import replace_section

from pagedserve.benchmarks import serve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACEMENTS = ("thread", "process")
# Room for the sweep's 256 requests; the default GGUF dequantized to bf16, the weights the peers (vLLM, transformers)
# run and the tables were first measured with (the quantized engine has its own section: quantized.py).
PAGEDSERVE_FLAGS = ["--dtype", "bfloat16", "--max-num-seqs", "256", "--dequantize-gguf"]
QUICK_CLIENT_ARGS = ["--concurrency", "1", "4", "--input-len", "32", "--output-len", "16", "--max-prompts", "8",
                     "--min-prompts", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in its own process group: ready once `GET ready_path` answers 200, stopped (group and all) on exit.

    Its output goes to a log file whose tail is shown if it dies or never gets ready.
    """

    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str] | None = None,
                 startup_timeout: float = 600.0, ready_path: str = "/health"):
        self.name, self.command, self.port, self.ready_path = name, command, port, ready_path
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.log_path = os.path.join(tempfile.gettempdir(), f"bench-{name.replace(' ', '_')}-{port}.log")
        self.process: subprocess.Popen | None = None
        self.ready_s: float | None = None  # launch -> first 200 from ready_path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        log(f"starting {self.name}: {' '.join(self.command)} (log: {self.log_path})")
        with open(self.log_path, "w") as log_file:
            self.process = subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=REPO, start_new_session=True)
        start = time.monotonic()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - start
        log(f"{self.name} ready in {self.ready_s:.0f} s")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])


def pagedserve_command(port: int, *flags: str) -> list[str]:
    """`pagedserve serve` on the default model with PAGEDSERVE_FLAGS and `flags`."""
    return [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            *PAGEDSERVE_FLAGS, *flags]


def run_sweep(base_url: str, client_args: list[str], max_quiet_wait_s: float = 300.0) -> dict:
    """`pagedserve bench serve --base-url URL CLIENT_ARGS...`, in this process, one concurrency level at a time:
    before each level it waits (bounded) for the rest of the machine to be quiet, and each level records what
    the rest of the machine used while it ran (`level["machine"]`, a MachineLoad label). Its results dict."""
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    ns = parser.parse_args(["--base-url", base_url, *client_args])
    serve.validate(ns)
    results: dict = {}
    seed = ns.seed
    for i, concurrency in enumerate(list(ns.concurrency)):
        wait_for_quiet(max_quiet_wait_s)
        # its own prompts per level (seed), so a prefix cache cannot serve one level from another's prompts
        ns.concurrency, ns.seed = [concurrency], seed + 1000 * i
        meter = OtherLoadMeter().start()
        one = asyncio.run(serve.run(ns))
        machine = meter.stop()
        level = one["levels"][0]
        level["machine"] = machine.label()
        log(f"  concurrency {concurrency}: {level['output_throughput']:,.1f} out tok/s, "
            f"TTFT p99 {level['ttft_ms']['p99'] if level['ttft_ms'] else float('nan'):,.0f} ms, "
            f"{level['failed']} failed; {machine.label()}")
        if results:
            results["levels"].append(level)
        else:
            results = one
    return results


def machine_table(sweeps: dict[str, dict]) -> str:
    """The rest of the machine's CPU use during each level of each sweep."""
    levels = sorted({lv["concurrency"] for results in sweeps.values() for lv in results["levels"]})
    rows = [[c, *(next((lv.get("machine", "-") for lv in r["levels"] if lv["concurrency"] == c), "-")
                  for r in sweeps.values())] for c in levels]
    return markdown_table(["concurrency", *sweeps], rows)


def plot_sweeps(sweeps: dict[str, dict], path: str, title: str) -> None:
    """Output tokens/s (left) and TTFT p99 (right) against concurrency, one line per sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    levels = sorted({lv["concurrency"] for results in sweeps.values() for lv in results["levels"]})
    for label, results in sweeps.items():
        done = [lv for lv in results["levels"] if lv["completed"]]
        x = [lv["concurrency"] for lv in done]
        throughput.plot(x, [lv["output_throughput"] for lv in done], marker="o", label=label)
        ttft.plot(x, [lv["ttft_ms"]["p99"] / 1000 for lv in done], marker="o", label=label)
    for ax, ylabel in ((throughput, "output tokens/s"), (ttft, "TTFT p99 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    throughput.set_ylim(bottom=0)
    ttft.set_yscale("log")
    ttft.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ttft.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ttft.yaxis.set_minor_formatter(NullFormatter())
    throughput.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_tables(sweeps: dict[str, dict]) -> str:
    return "\n\n".join(f"**{label}**\n\n{serve.results_table(results)}" for label, results in sweeps.items())


def throughput_ratios(sweeps: dict[str, dict], over: str, under: str) -> dict[int, float]:
    """Output tokens/s of sweep `over` / sweep `under`, per concurrency level both completed."""
    a = {lv["concurrency"]: lv["output_throughput"] for lv in sweeps[over]["levels"] if lv["completed"]}
    b = {lv["concurrency"]: lv["output_throughput"] for lv in sweeps[under]["levels"] if lv["completed"]}
    return {c: a[c] / b[c] for c in sorted(a.keys() & b.keys())}


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def client_settings(results: dict) -> str:
    levels = ", ".join(f"{lv['concurrency']}: {lv['num_prompts']}" for lv in results["levels"])
    return (f"random prompts of {results['input_len']} tokens, {results['output_len']} output tokens "
            f"(`ignore_eos`), greedy, streamed, seed {results['seed']}; requests per concurrency level: {levels}")


def chart_link(output: str, chart: str) -> str:
    return f"![{os.path.basename(chart)}]({os.path.relpath(chart, os.path.dirname(os.path.abspath(output)))})"


def section(sweeps: dict[str, dict], output: str, chart: str, minutes: float, quick: bool) -> str:
    first = next(iter(sweeps.values()))
    lines = [
        "## Serving: the engine loop in a thread vs its own process",
        "",
        f"Generated by `python benchmarks/serving.py{' --quick' if quick else ''}` in {minutes:.1f} min "
        "(part of `make bench`): `pagedserve serve` (default model, bfloat16) on a free loopback port, swept "
        "by `pagedserve bench serve` from the same machine.",
        "",
    ]
    if quick:
        lines += [QUICK_WARNING, ""]
    lines += [
        markdown_table(["", ""], [
            *machine_description(),
            ("Server", f"`pagedserve serve {' '.join(PAGEDSERVE_FLAGS)} --engine-placement {{thread,process}}`"),
            ("Client", client_settings(first)),
        ]),
        "",
        sweep_tables({f"engine loop in a {p}": results for p, results in sweeps.items()}),
        "",
        "Before each level the script waits (bounded) until other processes use under "
        f"{QUIET_OTHER_CORES} cores; the rest of the machine during each level (1-minute load at its start, "
        "the CPU other processes used while it ran):",
        "",
        machine_table({f"engine loop in a {p}": results for p, results in sweeps.items()}),
        "",
        chart_link(output, chart),
    ]
    if all(p in sweeps for p in PLACEMENTS):
        ratios = throughput_ratios(sweeps, "process", "thread")
        mean = geometric_mean(list(ratios.values()))
        lines += [
            "",
            "Output tokens/s, process / thread: "
            + ", ".join(f"{c}: {r:.2f}x" for c, r in ratios.items())
            + f" (geometric mean {mean:.2f}x): the faster placement here is "
            + f"**{'process' if mean > 1 else 'thread'}**.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(REPO, "BENCHMARKS.md"),
                        help="Markdown file whose `serving` section is rewritten")
    parser.add_argument("--chart", default=None, help="PNG path (default: BENCHMARKS-serving.png beside --output)")
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    parser.add_argument("--quick", action="store_true", help="a tiny sweep, to check the script")
    args = parser.parse_args()
    chart = args.chart or os.path.join(os.path.dirname(os.path.abspath(args.output)), "BENCHMARKS-serving.png")
    client_args = [*QUICK_CLIENT_ARGS, "--disable-tqdm"] if args.quick else []

    start = time.monotonic()
    sweeps = {}
    for placement in args.placements:
        port = free_port()
        with ServerProcess(f"pagedserve-{placement}", pagedserve_command(port, "--engine-placement", placement),
                           port) as server:
            log(f"sweep: pagedserve, engine loop in a {placement}")
            sweeps[placement] = run_sweep(server.base_url, client_args)
    plot_sweeps({f"pagedserve, engine in a {p}": r for p, r in sweeps.items()}, chart,
                "pagedserve serve: placement of the engine loop")
    body = section(sweeps, args.output, chart, (time.monotonic() - start) / 60, args.quick)
    replace_section(args.output, "serving", body)
    print(body)


if __name__ == "__main__":
    main()
