"""Tensor parallelism on this machine: one rank against two (a worker process), same model, same requests.

    python benchmarks/tensor_parallel.py [--output BENCHMARKS.md] [--rounds 3] [--quick]

One worker process per engine and round, interleaved (tp=1, tp=2, tp=2 over gloo, then backwards), each after a
bounded wait for a quiet machine, with what the rest of the machine used recorded. `tp=2` sums the ranks' partial
results through shared memory (the default on a CPU), `tp=2 gloo` through gloo's all-reduce
(`PAGEDSERVE_TP_ALL_REDUCE=gloo`). A worker loads the model once (not timed) and
runs B requests at once, 128 random prompt tokens and 64 generated (greedy, end of sequence ignored), for B in 1,
16 and 64. The model has Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 query and 2 key/value heads, MLP 4864,
vocabulary 151,936, tied head) with random bfloat16 weights, built once under .peers/: the default model's 9 heads
and 3 key/value heads do not split in two. Each rank gets the machine's cores divided by the ranks. Last, the
latency of one all-reduce between two processes (shared memory and gloo), of one decode token's hidden state and
of 64, which is what a step pays 2 x 24 + 1 times.
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

WORKLOADS = [("1 x 128/64", 1, 128, 64), ("16 x 128/64", 16, 128, 64), ("64 x 128/64", 64, 128, 64)]
QUICK_WORKLOADS = [("1 x 16/8", 1, 16, 8), ("4 x 16/8", 4, 16, 8)]
MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".peers", "tp-qwen2-0.5b-shape")
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
QUICK_SHAPE = dict(QWEN2_05B, num_hidden_layers=2, vocab_size=4096)
KV_CACHE_BYTES = 1 << 30


def build_model(quick: bool) -> str:
    """A random-weight checkpoint of Qwen2.5-0.5B's shape (bf16), with the default model's tokenizer; built once."""
    path = MODEL_DIR + ("-quick" if quick else "")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pagedserve.model_files import default_model_path
    from pagedserve.tokenizer import load_gguf_tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(**(QUICK_SHAPE if quick else QWEN2_05B), torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    load_gguf_tokenizer(default_model_path()).save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def worker(tp: int, quick: bool, round_index: int, model: str) -> None:
    from pagedserve import LLM, SamplingParams

    llm = LLM(model, dtype="bfloat16", max_model_len=1024, max_num_seqs=256, kv_cache_memory_bytes=KV_CACHE_BYTES,
              tensor_parallel_size=tp)
    rng = random.Random(round_index)
    llm.generate([{"prompt_token_ids": [100] * 16}], SamplingParams(max_tokens=4), use_tqdm=False)
    results = {}
    for name, batch, prompt_len, max_tokens in QUICK_WORKLOADS if quick else WORKLOADS:
        prompts = [{"prompt_token_ids": [rng.randrange(100, 4000) for _ in range(prompt_len)]} for _ in range(batch)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        assert generated == batch * max_tokens
        results[name] = generated / elapsed
    llm.engine.shutdown()
    print("RESULTS " + json.dumps({"tok_s": results}), flush=True)


def _all_reduce_rank(rank: int, address: str, out: dict) -> None:
    import torch

    from pagedserve.distributed import parallel_state

    torch.set_num_threads(1)
    parallel_state.init_tensor_parallel(rank, 2, address, "gloo")
    shm = parallel_state._shm
    for path in ("shared memory", "gloo"):
        parallel_state._shm = shm if path == "shared memory" else None
        for rows in (1, 64):
            x = torch.randn(rows, QWEN2_05B["hidden_size"]).to(torch.bfloat16)
            for _ in range(50):
                parallel_state.all_reduce(x)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(200):
                    parallel_state.all_reduce(x)
                times.append((time.perf_counter() - start) / 200)
            if rank == 0:
                out[f"{path}, {rows} x {QWEN2_05B['hidden_size']}"] = min(times) * 1e6
    parallel_state._shm = shm
    parallel_state.destroy_tensor_parallel()


def all_reduce_worker() -> None:
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with multiprocessing.Manager() as manager:
        out = manager.dict()
        procs = [multiprocessing.get_context("spawn").Process(target=_all_reduce_rank, args=(r, address, out))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        print("RESULTS " + json.dumps({"all_reduce_us": dict(out)}), flush=True)


def run_worker(command: list[str], env: dict | None = None) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600, env={**os.environ, **(env or {})})
    for line in result.stdout.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS "):])
    raise RuntimeError(f"{command[2:]} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="rewrite this file's tensor_parallel section")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "all-reduce":
        all_reduce_worker()
        return
    if args.worker:
        worker(int(args.worker), args.quick, args.round, args.model)
        return

    from common import OtherLoadMeter, log, machine_description, markdown_table, section_intro, wait_for_quiet
    from report import replace_section

    started = time.monotonic()
    model = build_model(args.quick)
    engines = {"tp=1": ("1", {}), "tp=2": ("2", {}), "tp=2 gloo": ("2", {"PAGEDSERVE_TP_ALL_REDUCE": "gloo"})}
    names = list(engines)
    results: dict[str, list[dict]] = {name: [] for name in names}
    machine: list[list[object]] = []
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            wait_for_quiet(30 if args.quick else 600)
            log(f"round {r + 1}: {name}")
            tp, env = engines[name]
            meter = OtherLoadMeter().start()
            results[name].append(run_worker([sys.executable, os.path.abspath(__file__), "--worker", tp, "--round",
                                             str(r), "--model", model, *(["--quick"] if args.quick else [])], env))
            machine.append([name, r + 1, meter.stop().label()])
            log(f"  {results[name][-1]}; {machine[-1][2]}")
    wait_for_quiet(30 if args.quick else 600)
    reduce_us = run_worker([sys.executable, os.path.abspath(__file__), "--worker", "all-reduce"])["all_reduce_us"]

    rows = []
    for workload, *_ in QUICK_WORKLOADS if args.quick else WORKLOADS:
        tok_s = {name: [res["tok_s"][workload] for res in results[name]] for name in names}
        row: list[object] = [workload]
        for name in names:
            row.append(" / ".join(f"{x:.1f}" for x in tok_s[name]))
            if name != "tp=1":
                row.append(f"**{statistics.median(b / a for a, b in zip(tok_s['tp=1'], tok_s[name])):.2f}x**")
        rows.append(row)
    minutes = (time.monotonic() - started) / 60
    body = "\n".join([
        "## Tensor parallel: one rank against two on this machine", "",
        *section_intro("tensor_parallel.py", args.quick, minutes, __doc__.split("\n\n")[2], machine_description()),
        markdown_table(["workload", "tp=1 output tok/s, per round", "tp=2, per round", "tp=2 / tp=1 (median)",
                        "tp=2 gloo, per round", "tp=2 gloo / tp=1 (median)"], rows), "",
        markdown_table(["all-reduce of a bf16 hidden state, 2 processes", "latency, us",
                        "x 49 per step (2 per layer + the embedding), ms"],
                       [[what, f"{us:.1f}", f"{49 * us / 1000:.2f}"] for what, us in reduce_us.items()]), "",
        f"This machine has {os.cpu_count()} cores: two ranks split the same cores and the same memory bandwidth "
        "that one rank uses whole, so tensor parallelism is not expected to be faster here; the table shows what it "
        "costs: the all-reduces, the messages to the worker, and rank 0's serial work (gathering and sampling the "
        "logits, scheduling) on one core while the other rank waits. It pays where each rank has its own GPU or "
        "socket.", "",
        markdown_table(["engine", "round", "rest of the machine during the worker (includes its start-up)"],
                       machine),
    ])
    print(body)
    if args.output:
        replace_section(args.output, "tensor_parallel", body)


if __name__ == "__main__":
    main()
