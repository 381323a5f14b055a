"""Where an engine step's time goes: a per-category profile of a decode step and a prefill step, at a baseline
commit and now, and the engine's start-up.

    python benchmarks/step_profile.py [--output BENCHMARKS.md] [--baseline REF] [--quick]

Each tree (the baseline, checked out once as a git worktree under /tmp, and this one) runs in its own worker
process (this file with `--worker`, PYTHONPATH set to that tree), the two interleaved A B, then B A, each after
a (bounded) wait for a quiet machine. A worker builds an `EngineCore` on the default model in bfloat16 (timed:
that is the engine's start-up), then:
- decode: 64 requests of 128 random prompt tokens; once all of them decode, the wall time of 10 steps
  (median), then 5 steps under torch.profiler;
- prefill: 2 requests of 1,024 random prompt tokens and 1 output token, so one step computes 2,048 prompt
  tokens (the default `max_num_batched_tokens`); the wall time of 3 such steps (median), then 2 profiled.
The profile sorts the time of each profiled step into categories by the nearest of a few named ranges the
worker wraps around the engine's own functions (scheduler, runner, model forward, attention, lm_head,
sampler) and by op: matmuls (`mm`, `linear`) under the forward are "linears", every other op there
"element-wise ops", and what is left of a range after its ops is Python. The profiler's own overhead inflates
the profiled step; the shares are what to read, and the unprofiled wall time is given beside them. Writes the
`step-profile` section.
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
from collections import defaultdict

from pagedserve.engine.protocol import AddRequest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "f837b7d"  # before issue 13's speed work (fused CPU ops, AMX prefill kernel)
LINEAR_OPS = ("mm", "linear", "matmul")
CATEGORIES = [  # (key, label)
    ("linear", "linears (projections, MLP)"),
    ("attention", "attention (KV write + kernel or SDPA)"),
    ("ops", "element-wise ops (norms, rope, activations, adds, casts)"),
    ("forward_python", "Python in the model's forward"),
    ("logits", "lm_head (logits)"),
    ("sampler", "sampler"),
    ("runner", "runner: batch preparation, per-step diffs"),
    ("scheduler", "scheduler"),
    ("engine", "engine core: the rest (stop checks, outputs)"),
]


# ----------------------------------------------------------------------------------------------------------
# Worker: runs inside the tree being measured
# ----------------------------------------------------------------------------------------------------------


def _ranged(name: str, fn):
    import torch

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return wrapped


def _instrument(core) -> None:
    """Named ranges around the engine's own functions (whatever of them this tree has)."""
    from pagedserve.model_executor.layers import attention

    attention.paged_attention = _ranged("cat:attention", attention.paged_attention)
    try:
        from pagedserve.model_executor.layers import cpu_ops
    except ImportError:  # a tree before the native CPU ops
        cpu_ops = None
    for name in ("rms_norm", "add_rms_norm_", "rope_"):
        if cpu_ops is not None and hasattr(cpu_ops, name):
            setattr(cpu_ops, name, _ranged(f"native::{name}", getattr(cpu_ops, name)))
    runner = core.model_runner
    runner.execute = _ranged("cat:execute", runner.execute)
    runner.update_states = _ranged("cat:update_states", runner.update_states)
    runner.model.forward = _ranged("cat:forward", runner.model.forward)
    runner.model.compute_logits = _ranged("cat:logits", runner.model.compute_logits)
    runner.sampler = _ranged("cat:sampler", runner.sampler)
    core.scheduler.schedule = _ranged("cat:scheduler", core.scheduler.schedule)


def _categorize(prof) -> list[dict[str, float]]:
    """Per profiled step (a `cat:step` range), milliseconds per category."""
    events = [e for e in prof.events() if e.device_type.name == "CPU"]

    def nearest_range(event) -> str | None:
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("cat:"):
            parent = parent.cpu_parent
        return None if parent is None else parent.name

    def step_of(event):
        while event is not None and event.name != "cat:step":
            event = event.cpu_parent
        return event

    steps = {id(e): defaultdict(float, wall=e.cpu_time_total / 1000) for e in events if e.name == "cat:step"}
    for event in events:
        step = step_of(event.cpu_parent)
        if step is None:
            continue
        out = steps[id(step)]
        if event.name.startswith("cat:"):
            key = event.name[4:]
            out[key] += event.cpu_time_total / 1000
        elif nearest_range(event) == "cat:forward":
            kind = "linear" if any(op in event.name.split("::")[-1] for op in LINEAR_OPS) else "ops"
            out[kind] += event.self_cpu_time_total / 1000
    result = []
    for t in steps.values():
        result.append({
            "linear": t["linear"], "attention": t["attention"], "ops": t["ops"],
            "forward_python": t["forward"] - t["attention"] - t["linear"] - t["ops"],
            "logits": t["logits"], "sampler": t["sampler"],
            "runner": t["execute"] - t["forward"] - t["logits"] - t["sampler"] + t["update_states"],
            "scheduler": t["scheduler"],
            "engine": t["wall"] - t["scheduler"] - t["update_states"] - t["execute"],
            "total": t["wall"],
        })
    return result


def worker(quick: bool) -> None:
    import torch

    from pagedserve.config import create_engine_config
    from pagedserve.engine.engine_core import EngineCore
    from pagedserve.engine_args import EngineArgs
    from pagedserve.sampling_params import SamplingParams

    start = time.perf_counter()
    # bf16 weights in both trees (the baseline predates quantized GGUF; a .gguf runs quantized by default since)
    dequantize = {"dequantize_gguf": True} if hasattr(EngineArgs, "dequantize_gguf") else {}
    core = EngineCore(create_engine_config(EngineArgs(dtype="bfloat16", max_num_seqs=256, **dequantize)))
    startup_s = time.perf_counter() - start
    _instrument(core)
    vocab = core.limits.vocab_size
    rng = random.Random(0)
    next_id = iter(range(10**9))

    def add(count: int, prompt_len: int, max_tokens: int) -> list[str]:
        ids = []
        for _ in range(count):
            request_id = f"r{next(next_id)}"
            core.add_request(AddRequest(request_id, [rng.randrange(vocab) for _ in range(prompt_len)],
                             SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)))
            ids.append(request_id)
        return ids

    def timed_step() -> float:
        t0 = time.perf_counter()
        core.step()
        return 1000 * (time.perf_counter() - t0)

    def profiled(steps: int, setup) -> list[dict[str, float]]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                setup()
                with torch.profiler.record_function("cat:step"):
                    core.step()
        return _categorize(prof)

    num_seqs, prompt_len = (8, 32) if quick else (64, 128)
    decode_ids = add(num_seqs, prompt_len, 10_000)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in core.scheduler.running) or \
            core.scheduler.waiting:
        core.step()
    core.step()
    decode_wall = statistics.median(timed_step() for _ in range(3 if quick else 10))
    decode_profile = profiled(2 if quick else 5, lambda: None)
    core.abort_requests(decode_ids)

    prefill_len = 128 if quick else 1024

    def prefill_setup() -> None:
        add(2, prefill_len, 1)

    prefill_walls = []
    for _ in range(2 if quick else 3):
        prefill_setup()
        prefill_walls.append(timed_step())
        while core.has_unfinished_requests():
            core.step()
    prefill_profile = profiled(2, prefill_setup)
    import pagedserve

    result = {
        "package": os.path.dirname(pagedserve.__file__),
        "startup_s": startup_s,
        "decode": {"wall_ms": decode_wall, "num_seqs": num_seqs, "profile": decode_profile},
        "prefill": {"wall_ms": statistics.median(prefill_walls), "tokens": 2 * prefill_len,
                    "profile": prefill_profile},
    }
    print("RESULTS " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def baseline_tree(ref: str) -> str:
    """A worktree of `ref` under /tmp (made once per commit)."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.strip()
    path = f"/tmp/pagedserve-baseline-{commit}"
    if not os.path.isdir(path):
        subprocess.run(["git", "worktree", "add", "--detach", path, commit], cwd=REPO, check=True)
    return path


def run_worker(tree: str, quick: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *(["--quick"] if quick else [])],
                          cwd=tree, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULTS "):
            result = json.loads(line[len("RESULTS "):])
            if not result["package"].startswith(tree):
                raise RuntimeError(f"the worker for {tree} imported pagedserve from {result['package']}")
            return result
    raise RuntimeError(f"worker in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _median_profile(profiles: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(p[key] for p in profiles) for key in profiles[0]}


def profile_table(results: dict[str, list[dict]], phase: str) -> str:
    from common import markdown_table

    header = ["category"]
    columns = []
    for label, runs in results.items():
        merged = _median_profile([p for run in runs for p in run[phase]["profile"]])
        columns.append(merged)
        header += [f"{label}: ms", f"{label}: share"]
    rows = []
    for key, name in CATEGORIES:
        row = [name]
        for merged in columns:
            row += [f"{merged[key]:.2f}", f"{100 * merged[key] / merged['total']:.0f}%"]
        rows.append(row)
    total_row, wall_row = ["**profiled step**"], ["**step wall time, not profiled (median)**"]
    for runs, merged in zip(results.values(), columns):
        total_row += [f"**{merged['total']:.2f}**", "100%"]
        wall_row += [" / ".join(f"{run[phase]['wall_ms']:.2f}" for run in runs), ""]
    return markdown_table(header, [*rows, total_row, wall_row])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="Markdown file whose `step-profile` section is rewritten")
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare with")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.quick)
        return

    from common import OtherLoadMeter, log, machine_description, markdown_table, section_intro, wait_for_quiet
    from report import replace_section

    started = time.monotonic()
    trees = {f"baseline {args.baseline}": baseline_tree(args.baseline), "now": REPO}
    results: dict[str, list[dict]] = {label: [] for label in trees}
    machine: list[list[str]] = []
    for r in range(2):
        for label in list(trees) if r == 0 else list(trees)[::-1]:
            wait_for_quiet(30 if args.quick else 300)
            meter = OtherLoadMeter().start()
            results[label].append(run_worker(trees[label], args.quick))
            machine.append([label, str(r + 1), meter.stop().label()])
            log(f"{label}, round {r + 1}: decode {results[label][-1]['decode']['wall_ms']:.1f} ms, prefill "
                f"{results[label][-1]['prefill']['wall_ms']:.1f} ms; {machine[-1][2]}")
    first = next(iter(results.values()))[0]
    startup_rows = [[label, " / ".join(f"{run['startup_s']:.2f}" for run in runs)] for label, runs in results.items()]
    minutes = (time.monotonic() - started) / 60
    body = "\n".join([
        "## Where a step's time goes: decode and prefill, before and after", "",
        *section_intro("step_profile.py", args.quick, minutes, __doc__.split("\n\n")[2], machine_description()),
        f"### A decode step: {first['decode']['num_seqs']} sequences", "",
        profile_table(results, "decode"), "",
        f"### A prefill step: {first['prefill']['tokens']:,} prompt tokens (2 requests)", "",
        profile_table(results, "prefill"), "",
        "### Start-up: `EngineCore(...)` on the default model, bfloat16 (seconds, per round)", "",
        markdown_table(["tree", "seconds"], startup_rows), "",
        markdown_table(["tree", "round", "rest of the machine during the worker"], machine),
    ])
    print(body)
    if args.output:
        replace_section(args.output, "step-profile", body)


if __name__ == "__main__":
    main()
