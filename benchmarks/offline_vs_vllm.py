"""pagedserve against vLLM's CPU build offline, through the same `LLM` API script, on the same bf16 weights.

    python benchmarks/offline_vs_vllm.py [--output BENCHMARKS.md] [--rounds 2] [--quick]

One worker process per engine and round (this file, run with `--worker ENGINE` by that engine's Python:
`.venv` for pagedserve, `.peers/vllm` for vLLM; `peers.py` installs vLLM once), engines interleaved: A B C, then
C B A. Before each worker the script waits (bounded) for a quiet machine (other processes under 0.2 cores) and
records what the rest of the machine used while the worker ran. Each worker loads the model once (vLLM's
start-up, about a minute of torch.compile, is not timed) and runs:
- output tok/s of B requests at once, 128 random prompt tokens and 128 generated (`ignore_eos`, greedy), for B
  in 1, 16, 64, 256;
- long prompts: 32 requests of 1,024 prompt tokens and 128 generated (output tok/s);
- prefill: 32 requests of 1,024 prompt tokens and 1 generated (prompt tok/s).
pagedserve runs a second time per round with overlapped scheduling (`async_scheduling=True`), unless --no-async.
Prompts are random token ids drawn from a fixed seed, new for every workload and round (no prefix-cache hits),
the same for both engines. Each engine keeps its own defaults otherwise (vLLM: 128-token KV blocks,
its own token budget per step; pagedserve: 16-token blocks, 2,048). Writes the `offline-vs-vllm` section.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

WORKLOADS = [("1 x 128/128", 1, 128, 128), ("16 x 128/128", 16, 128, 128), ("64 x 128/128", 64, 128, 128),
             ("256 x 128/128", 256, 128, 128), ("long: 32 x 1024/128", 32, 1024, 128),
             ("prefill: 32 x 1024/1", 32, 1024, 1)]
QUICK_WORKLOADS = [("1 x 32/16", 1, 32, 16), ("8 x 64/16", 8, 64, 16), ("prefill: 4 x 256/1", 4, 256, 1)]
ASYNC = "pagedserve-async"  # pagedserve with async_scheduling=True, interleaved with the others
KV_CACHE_GIB = 2
MAX_MODEL_LEN = 2048


def worker(engine: str, model: str, quick: bool, round_index: int) -> None:
    """Run every workload in this process and print one JSON line of results."""
    if engine == "vllm":
        from vllm import LLM, SamplingParams

        llm = LLM(model=model, dtype="bfloat16", max_model_len=MAX_MODEL_LEN, max_num_seqs=256)
        kwargs: dict = {"use_tqdm": False}
    else:
        from pagedserve import LLM, SamplingParams

        llm = LLM(model, dtype="bfloat16", max_model_len=MAX_MODEL_LEN, max_num_seqs=256,
                  kv_cache_memory_bytes=KV_CACHE_GIB << 30, async_scheduling=engine == ASYNC)
        kwargs = {"use_tqdm": False}
    llm.generate([{"prompt_token_ids": [100] * 16}], SamplingParams(max_tokens=4, temperature=0), **kwargs)
    results = {}
    for i, (name, batch, prompt_len, max_tokens) in enumerate(QUICK_WORKLOADS if quick else WORKLOADS):
        rng = random.Random(1000 * round_index + i)
        prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(prompt_len)]} for _ in range(batch)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, **kwargs)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        assert generated == batch * max_tokens, f"{name}: {generated} tokens, not {batch * max_tokens}"
        rate = batch * prompt_len / elapsed if max_tokens == 1 else generated / elapsed
        results[name] = rate
    print("RESULTS " + json.dumps(results), flush=True)


def run_worker(engine: str, python: str, model: str, quick: bool, round_index: int, env: dict) -> dict:
    command = [python, os.path.abspath(__file__), "--worker", engine, "--model", model, "--round", str(round_index)]
    if quick:
        command.append("--quick")
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=3600)
    for line in result.stdout.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS "):])
    raise RuntimeError(f"{engine} worker failed ({result.returncode}):\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="rewrite this file's offline-vs-vllm section")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--no-async", action="store_true", help="skip the pagedserve --async-scheduling runs")
    parser.add_argument("--worker", choices=["pagedserve", ASYNC, "vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.quick, args.round)
        return

    import peers
    from common import OtherLoadMeter, log, machine_description, markdown_table, section_intro, verdict, wait_for_quiet
    from report import replace_section

    started = time.monotonic()
    vllm_python = os.path.join(peers.setup_vllm(), "bin", "python")
    model = peers.export_hf_dir()
    engines = {"pagedserve": (sys.executable, {}),
               "vllm": (vllm_python, {**peers.VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)})}
    if not args.no_async:
        engines[ASYNC] = (sys.executable, {})
    results: dict[str, list[dict]] = {engine: [] for engine in engines}
    machine: dict[str, list[str]] = {engine: [] for engine in engines}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for engine in order:
            wait_for_quiet(30 if args.quick else 600)
            log(f"round {r + 1}: {engine}")
            python, env = engines[engine]
            meter = OtherLoadMeter().start()
            results[engine].append(run_worker(engine, python, model, args.quick, r, env))
            machine[engine].append(meter.stop().label())
            log(f"  {results[engine][-1]}; {machine[engine][-1]}")

    rows, goals = [], []
    for name, *_ in QUICK_WORKLOADS if args.quick else WORKLOADS:
        ours = [res[name] for res in results["pagedserve"]]
        theirs = [res[name] for res in results["vllm"]]
        ratios = [a / b for a, b in zip(ours, theirs)]
        goals.append([f"{name}: >= 1.25x vLLM", f"{statistics.median(ratios):.2f}x",
                      verdict(statistics.median(ratios) >= 1.25)])
        unit = "prompt tok/s" if name.startswith("prefill") else "output tok/s"
        rows.append([name, unit, " / ".join(f"{x:.1f}" for x in ours), " / ".join(f"{x:.1f}" for x in theirs),
                     " / ".join(f"{x:.2f}" for x in ratios), f"**{statistics.median(ratios):.2f}x**"])
        if ASYNC in results:
            overlapped = [res[name] for res in results[ASYNC]]
            rows[-1] += [" / ".join(f"{x:.1f}" for x in overlapped),
                         f"{statistics.median(a / b for a, b in zip(overlapped, ours)):.2f}x"]
    machine_rows = [[engine, r + 1, label] for engine, labels in machine.items() for r, label in enumerate(labels)]
    minutes = (time.monotonic() - started) / 60
    body = "\n".join([
        "## Offline: pagedserve vs vLLM through the same script", "",
        *section_intro("offline_vs_vllm.py", args.quick, minutes, __doc__.split("\n\n")[2], machine_description()),
        "Weights: SmolLM2-135M-Instruct in bfloat16, the same HF directory for both (the default GGUF "
        f"dequantized once, `peers.export_hf_dir`); KV cache {KV_CACHE_GIB} GiB each, `max_model_len` "
        f"{MAX_MODEL_LEN}, `max_num_seqs` 256. Rounds: the order of the engines is reversed in every other round.", "",
        markdown_table(["workload", "unit", "pagedserve, per round", "vLLM 0.32 CPU, per round",
                        "ratio per round", "median ratio",
                        *(["pagedserve --async-scheduling, per round", "async / sync (median)"]
                          if ASYNC in results else [])], rows), "",
        markdown_table(["engine", "round", "rest of the machine during the worker (includes its start-up)"],
                       machine_rows), "",
        "Goal (issue 13): >= 1.25x vLLM at every size, on long prompts and in prefill.", "",
        markdown_table(["goal", "measured (median ratio)", "verdict"], goals),
    ])
    print(body)
    if args.output:
        replace_section(args.output, "offline-vs-vllm", body)


if __name__ == "__main__":
    main()
