"""Quantized weights: pagedserve on the default Q4_1 GGUF kept quantized, against the same weights in bfloat16,
llama.cpp on the same file and vLLM's CPU build in bfloat16 (`make bench-peers`).

    python benchmarks/quantized.py [--output BENCHMARKS.md] [--rounds 2] [--quick]

One worker process per engine and round (this file, run with `--worker ENGINE` by that engine's Python), engines
interleaved: A B C D, then D C B A, each after a bounded wait for a quiet machine, with what the rest of the
machine used recorded. A worker loads its model once (not timed) and runs B requests at once, 128 random prompt
tokens and 128 generated (greedy, end of sequence ignored), for B in 1, 16, 64 and 256. llama.cpp runs 1 and 16
only: llama-cpp-python's `Llama` runs one sequence at a time, so 16 requests already show its ceiling. Each worker
reports its peak resident memory; pagedserve's also report the bytes its model's weights take in memory. Last,
the perplexity of the default model on a fixed text (`benchmarks/data/perplexity.txt`), quantized and bfloat16,
teacher-forced both as one prefill (the batched kernels) and one token per step (the decode kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time

WORKLOADS = [("1 x 128/128", 1, 128, 128), ("16 x 128/128", 16, 128, 128), ("64 x 128/128", 64, 128, 128),
             ("256 x 128/128", 256, 128, 128)]
QUICK_WORKLOADS = [("1 x 32/16", 1, 32, 16), ("8 x 32/16", 8, 32, 16)]
SEQUENTIAL_MAX_BATCH = 16  # llama-cpp-python runs requests one after another: larger batches add nothing
KV_CACHE_GIB = 2
MAX_MODEL_LEN = 2048
TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "perplexity.txt")
QUANTIZED, BF16, LLAMA_CPP, VLLM = "pagedserve Q4_1", "pagedserve bf16", "llama.cpp Q4_1", "vLLM bf16"
PAGEDSERVE_KWARGS = {QUANTIZED: {"quantization": "gguf"}, BF16: {"dequantize_gguf": True}}


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def weight_bytes(model: object) -> int:
    """Bytes of every tensor the model's modules hold (parameters, buffers, packed weights), the KV cache aside;
    a tensor held twice (a tied head) counts once."""
    import torch

    seen: dict[int, int] = {}
    for module in model.modules():  # type: ignore[attr-defined]
        for name, value in vars(module).items():
            tensors = value.values() if name in ("_parameters", "_buffers") else [value]
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and name != "kv_cache":
                    seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _prompts(batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(prompt_len)] for _ in range(batch)]


def worker(engine: str, quick: bool, round_index: int, model: str) -> None:
    """Run every workload in this process and print one JSON line of results (`model`: the GGUF file, or the bf16
    HF directory for vLLM)."""
    results: dict[str, float] = {}
    workloads = QUICK_WORKLOADS if quick else WORKLOADS
    extra: dict[str, float] = {}
    if engine == LLAMA_CPP:
        import llama_cpp.llama_cpp as llama_cpp_c
        from llama_cpp import Llama

        defaults = llama_cpp_c.llama_model_default_params

        def model_params() -> object:
            # llama.cpp's AMX matmul (an "extra buffer type") segfaults on this machine (ggml_backend_amx_mul_mat,
            # any prompt, with AMX permission granted), so it runs without: its AVX512-VNNI kernels.
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp_c.llama_model_default_params = model_params
        llm = Llama(model_path=model, n_threads=os.cpu_count(), n_ctx=512, n_batch=512,
                    verbose=False)

        def generate(prompts: list[list[int]], max_tokens: int) -> int:
            generated = 0
            for prompt in prompts:
                for generated_here, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), 1):
                    if generated_here == max_tokens:  # llama_cpp's generate does not stop at the end token itself
                        break
                generated += generated_here
            return generated

        workloads = [w for w in workloads if w[1] <= SEQUENTIAL_MAX_BATCH]
    else:
        if engine == VLLM:
            from vllm import LLM, SamplingParams

            llm = LLM(model=model, dtype="bfloat16", max_model_len=MAX_MODEL_LEN, max_num_seqs=256)
        else:
            from pagedserve import LLM, SamplingParams

            llm = LLM(model, dtype="bfloat16", max_model_len=MAX_MODEL_LEN, max_num_seqs=256,
                      kv_cache_memory_bytes=KV_CACHE_GIB << 30, **PAGEDSERVE_KWARGS[engine])
            extra["weight_mib"] = weight_bytes(llm.engine.model_runner.model) / 2**20

        def generate(prompts: list[list[int]], max_tokens: int) -> int:
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outputs)

    generate([[100] * 16], 4)
    for i, (name, batch, prompt_len, max_tokens) in enumerate(workloads):
        prompts = _prompts(batch, prompt_len, 1000 * round_index + i)
        start = time.perf_counter()
        generated = generate(prompts, max_tokens)
        elapsed = time.perf_counter() - start
        assert generated == batch * max_tokens, f"{name}: {generated} tokens, not {batch * max_tokens}"
        results[name] = generated / elapsed
    print("RESULTS " + json.dumps({"tok_s": results, "peak_rss_mib": peak_rss_mib(), **extra}), flush=True)


def perplexity_worker(quick: bool) -> None:
    """Perplexity of the default model on TEXT, quantized and bf16, as one prefill and token by token."""
    import torch

    from pagedserve.config import create_engine_config
    from pagedserve.engine_args import EngineArgs
    from pagedserve.model_executor.loader import load_model
    from pagedserve.model_executor.scoring import teacher_forced_logits
    from pagedserve.model_files import default_model_path
    from pagedserve.tokenizer import load_gguf_tokenizer

    ids = load_gguf_tokenizer(default_model_path())(open(TEXT).read()).input_ids
    ids = ids[:128] if quick else ids
    results = {}
    for engine in (QUANTIZED, BF16):
        config = create_engine_config(EngineArgs(dtype="bfloat16", max_model_len=2048, **PAGEDSERVE_KWARGS[engine]))
        model = load_model(config)
        for mode in ("prefill", "decode"):
            logits = teacher_forced_logits(model, ids, mode == "decode", config.dtype, config.device)
            logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
            nll = -logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).mean().item()
            results[f"{engine}, {mode}"] = math.exp(nll)
    print("RESULTS " + json.dumps({"perplexity": results, "tokens": len(ids)}), flush=True)


def run_worker(command: list[str], env: dict) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=3600)
    for line in result.stdout.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS "):])
    raise RuntimeError(f"{command[3:]} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="rewrite this file's quantized section")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--engines", nargs="+", default=[QUANTIZED, BF16, LLAMA_CPP, VLLM])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "perplexity":
        perplexity_worker(args.quick)
        return
    if args.worker:
        worker(args.worker, args.quick, args.round, args.model)
        return

    import peers
    from common import (
        OtherLoadMeter,
        log,
        machine_description,
        markdown_table,
        median_ratio,
        section_intro,
        verdict,
        wait_for_quiet,
    )
    from report import replace_section

    started = time.monotonic()
    pythons = {QUANTIZED: sys.executable, BF16: sys.executable}
    envs: dict[str, dict] = {QUANTIZED: {}, BF16: {}}
    if LLAMA_CPP in args.engines:
        pythons[LLAMA_CPP] = os.path.join(peers.setup_llama_cpp(), "bin", "python")
        envs[LLAMA_CPP] = {}
    if VLLM in args.engines:
        pythons[VLLM] = os.path.join(peers.setup_vllm(), "bin", "python")
        envs[VLLM] = {**peers.VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
    from pagedserve.model_files import default_model_path

    models = {engine: default_model_path() for engine in pythons}
    if VLLM in pythons:
        models[VLLM] = peers.export_hf_dir()
    engines = [e for e in args.engines if e in pythons]
    results: dict[str, list[dict]] = {engine: [] for engine in engines}
    machine: dict[str, list[str]] = {engine: [] for engine in engines}
    for r in range(args.rounds):
        for engine in engines if r % 2 == 0 else engines[::-1]:
            wait_for_quiet(30 if args.quick else 600)
            log(f"round {r + 1}: {engine}")
            command = [pythons[engine], os.path.abspath(__file__), "--worker", engine, "--round", str(r),
                       "--model", models[engine], *(["--quick"] if args.quick else [])]
            meter = OtherLoadMeter().start()
            results[engine].append(run_worker(command, envs[engine]))
            machine[engine].append(meter.stop().label())
            log(f"  {results[engine][-1]}; {machine[engine][-1]}")
    log("perplexity")
    perplexity = run_worker([sys.executable, os.path.abspath(__file__), "--worker", "perplexity",
                             *(["--quick"] if args.quick else [])], {})

    def per_round(engine: str, name: str) -> list[float]:
        return [res["tok_s"][name] for res in results.get(engine, []) if name in res["tok_s"]]

    rows = []
    for name, *_ in QUICK_WORKLOADS if args.quick else WORKLOADS:
        quantized = per_round(QUANTIZED, name)
        row: list[object] = [name, " / ".join(f"{x:.1f}" for x in quantized)]
        for other in engines[1:]:
            theirs = per_round(other, name)
            ratio = median_ratio(quantized, theirs)
            row += [" / ".join(f"{x:.1f}" for x in theirs) or "not run",
                    "-" if ratio is None else f"**{ratio:.2f}x**"]
        rows.append(row)
    memory_rows = []
    for engine in engines:
        weights = [res["weight_mib"] for res in results[engine] if "weight_mib" in res]
        memory_rows.append([engine, f"{max(res['peak_rss_mib'] for res in results[engine]):,.0f}",
                            f"{weights[0]:,.1f}" if weights else "-"])
    weight_share = ""
    goal_rows: list[list[str]] = []
    if BF16 in results and results[BF16] and QUANTIZED in results:
        share = results[QUANTIZED][0]["weight_mib"] / results[BF16][0]["weight_mib"]
        weight_share = f"Quantized weights take **{share:.0%}** of the bf16 weights' bytes (goal: <= 30%)."
        goal_rows.append(["quantized weights <= 30% of the bf16 weights' bytes", f"{share:.0%}",
                          verdict(share <= 0.30)])
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    single, batched = workloads[0][0], [name for name, batch, *_ in workloads if batch >= 64]
    ratio = median_ratio(per_round(QUANTIZED, single), per_round(LLAMA_CPP, single))
    goal_rows.append([f"single stream ({single}) >= 1.25x {LLAMA_CPP} on the same file",
                      "not run" if ratio is None else f"{ratio:.2f}x",
                      "not measured" if ratio is None else verdict(ratio >= 1.25)])
    for name in batched:
        ratio = median_ratio(per_round(QUANTIZED, name), per_round(BF16, name))
        goal_rows.append([f"{name}: >= {BF16}'s throughput", "not run" if ratio is None else f"{ratio:.2f}x",
                          "not measured" if ratio is None else verdict(ratio >= 1.0)])
    machine_rows = [[engine, r + 1, label] for engine, labels in machine.items() for r, label in enumerate(labels)]
    ppl = perplexity["perplexity"]
    minutes = (time.monotonic() - started) / 60
    header = ["workload", f"{QUANTIZED} output tok/s, per round"]
    for other in engines[1:]:
        header += [f"{other}, per round", f"{QUANTIZED} / {other} (median)"]
    body = "\n".join([
        "## Quantized weights: the default Q4_1 GGUF kept quantized", "",
        *section_intro("quantized.py", args.quick, minutes, __doc__.split("\n\n")[2], machine_description()),
        f"Model: SmolLM2-135M-Instruct, `{QUANTIZED}` = the default GGUF file with its linear weights kept in Q4_1 "
        f"(`quantization=\"gguf\"`), `{BF16}` = the same file dequantized to bfloat16 (`dequantize_gguf=True`), "
        f"`{LLAMA_CPP}` = llama-cpp-python {peers.LLAMA_CPP_PYTHON_VERSION} (built with -DGGML_NATIVE=ON, "
        f"{os.cpu_count()} threads) on the same file, `{VLLM}` = vLLM {peers.VLLM_VERSION} CPU on the file "
        f"dequantized to a bfloat16 HF directory. KV cache {KV_CACHE_GIB} GiB for pagedserve and vLLM.", "",
        markdown_table(header, rows), "",
        "Goals (issue 14), each ratio the median of the per-round ratios:", "",
        markdown_table(["goal", "measured", "verdict"], goal_rows), "",
        "### Memory", "",
        markdown_table(["engine", "peak resident memory, MiB (includes the KV cache an engine allocates)",
                        "model weights in memory, MiB"], memory_rows), "",
        weight_share, "",
        f"### Perplexity on a fixed text ({perplexity['tokens']} tokens, `benchmarks/data/perplexity.txt`)", "",
        markdown_table(["weights", "one prefill", "one token per step"],
                       [[e, f"{ppl[f'{e}, prefill']:.3f}", f"{ppl[f'{e}, decode']:.3f}"] for e in (QUANTIZED, BF16)]),
        "",
        markdown_table(["engine", "round", "rest of the machine during the worker (includes its start-up)"],
                       machine_rows),
    ])
    print(body)
    if args.output:
        replace_section(args.output, "quantized", body)


if __name__ == "__main__":
    main()
