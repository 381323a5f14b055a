"""Speculative decoding: output tok/s with model-free drafts (vLLM's `ngram` and `suffix` methods) against none, on
an agent trace whose answers restate their context and on random prompts where drafts never hit.

    python benchmarks/speculative.py [--output BENCHMARKS.md] [--quick] [--vllm]

Offline, through `LLM.chat` / `LLM.generate` on the default model (SmolLM2-135M-Instruct, its Q4_1 GGUF kept
quantized), greedy, so every method generates the same tokens (checked: the table says whether the outputs were
identical) and tok/s compares time per token. The agent trace is made from real text (this repository's README and
architecture notes, functions of Python's standard library) and JSON records: turns that re-emit a record with one
field changed, call a tool with arguments taken from its result, rewrite a function with a rename, quote a
paragraph; plus open-ended chat turns.
The goals are about the copy-heavy turns; open-ended chat turns show what drafts do for text that copies little. At
1 request at once, four turns run alone, one after another; at N > 1, N turns run at once. No turn is asked twice in
a run, and no random prompt either: the suffix method's cache of past outputs would find its own answers again.
Methods run interleaved (none, ngram, suffix, then again) in one process; each round and the median. With --vllm,
vLLM's CPU build (installed under .peers/ by peers.py) runs copy-heavy turns at 1 and 16 at once (turns of its own,
made the same way) with the same ngram config and without, each in its own process under vLLM's Python, interleaved
by round, on the same weights dequantized to an HF checkpoint in bf16 (its `suffix` method needs arctic-inference,
which its CPU build does not ship).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import statistics
import subprocess
import time

from common import OtherLoadMeter, log, machine_description, markdown_table, section_intro, verdict, wait_for_quiet
from report import REPO, replace_section

METHODS: dict[str, dict | None] = {
    "none": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
    "suffix": {"method": "suffix"},  # vLLM's defaults: drafts of up to 24 tokens, sized by their probability
}
CITIES = [("Lisbon", "PT", 38.7223, -9.1393), ("Oslo", "NO", 59.9139, 10.7522), ("Osaka", "JP", 34.6937, 135.5023),
          ("Quito", "EC", -0.1807, -78.4678), ("Perth", "AU", -31.9523, 115.8613), ("Tunis", "TN", 36.8065, 10.1815)]
NAMES = ["Acme Corporation", "Globex Ltd", "Initech", "Umbrella Health", "Stark Logistics", "Wayne Foods"]
# Modules whose public functions (their source, 300-1,200 characters) are the code the rename turns rewrite.
SOURCE_MODULES = ["json", "textwrap", "shlex", "statistics", "fnmatch", "glob", "csv", "base64", "heapq", "bisect",
                  "string", "html", "difflib", "calendar", "ipaddress", "urllib.parse", "email.utils", "posixpath",
                  "random", "functools", "copy", "pprint", "fractions", "decimal"]
COPY, CHAT, RANDOM = "copy-heavy agent turns", "open-ended chat turns", "random prompts"
CHAT_TOPICS = ["a lighthouse keeper who finds a message in a bottle", "a robot that learns to paint",
               "a city where it never stops raining", "two rival bakers in a small town",
               "an astronaut who hears music in space", "a library that rearranges itself at night"]


def paragraphs() -> list[str]:
    """Paragraphs of this repository's README and architecture notes: real text to quote."""
    found = []
    for name in ("README.md", os.path.join("docs", "architecture.md")):
        with open(os.path.join(REPO, name)) as f:
            found += [p[:900] for p in f.read().split("\n\n") if len(p) > 300 and not p.startswith(("```", "|", "#"))]
    return found


def function_sources() -> list[str]:
    sources = []
    for module_name in SOURCE_MODULES:
        module = importlib.import_module(module_name)
        for name, value in sorted(vars(module).items()):
            if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_"):
                try:
                    source = inspect.getsource(value)
                except OSError:  # defined where its source is not at hand
                    continue
                if 300 <= len(source) <= 1200:
                    sources.append(source)
    return sources


class AgentTrace:
    """Turn i of a kind of turns (i = 0, 1, ...): copy-heavy turns take each kind in turn, chat turns are open-ended;
    every turn has its own text, so no two turns of a run ask the same (the suffix method's cache of past outputs
    would otherwise find its own answers)."""

    COPY_KINDS = ("JSON record, one field changed", "tool call from a tool result", "function rewritten with a rename",
                  "quoted summary")

    def __init__(self) -> None:
        self.paragraphs = paragraphs()
        self.sources = function_sources()

    def turn(self, workload: str, i: int) -> list[dict]:
        if workload == CHAT:
            topic = CHAT_TOPICS[i % len(CHAT_TOPICS)]
            ask = ["Write a short story about", "Describe, in a few paragraphs,", "Write a poem about"][i // len(
                CHAT_TOPICS) % 3]
            return [{"role": "user", "content": f"{ask} {topic}."}]
        kind, n = self.COPY_KINDS[i % len(self.COPY_KINDS)], i // len(self.COPY_KINDS)
        if kind.startswith("JSON"):
            record = {"id": 4312 + n, "name": NAMES[n % len(NAMES)], "email": f"billing{n}@example.com",
                      "plan": ["starter", "team", "enterprise"][n % 3], "seats": 20 + 7 * n,
                      "renewal": f"2027-{1 + n % 12:02d}-01",
                      "owner": {"name": "Jane Doe", "phone": f"+1-555-01{n:02d}"}}
            text = (f"Here is a customer record:\n{json.dumps(record, indent=2)}\nReturn the record exactly as JSON, "
                    f"with seats changed to {record['seats'] + 50}.")
        elif kind.startswith("tool"):
            city, country, lat, lon = CITIES[n % len(CITIES)]
            result = {"location": {"city": city, "country": country, "lat": lat, "lon": lon},
                      "forecast": [{"date": f"2026-12-{8 + d:02d}", "high_c": 15 + (n + d) % 9, "low_c": 8 + d,
                                    "summary": ["light rain", "cloudy", "sunny"][(n + d) % 3]} for d in range(2)]}
            text = (f"The weather tool returned:\n{json.dumps(result, indent=2)}\nCall the tool `book_umbrella` with "
                    'the JSON arguments {"city": ..., "lat": ..., "lon": ...} taken from this result. Answer with the '
                    "JSON arguments only.")
        elif kind.startswith("function"):
            text = ("Rewrite this Python function, renaming its first parameter to `value` everywhere, and change "
                    f"nothing else:\n\n{self.sources[n % len(self.sources)]}")
        else:
            text = ("Quote the following paragraph word for word, then add one sentence that sums it up:\n\n"
                    + self.paragraphs[n % len(self.paragraphs)])
        return [{"role": "user", "content": text}]


def run_trace(llm, turns: list[list[dict]], at_once: int, params) -> tuple[float, list]:
    """(output tok/s, the outputs' token ids): one turn at a time, or all of them at once (pagedserve's LLM or
    vLLM's, with its SamplingParams)."""
    start = time.perf_counter()
    if at_once == 1:
        outputs = [llm.chat(messages, params, use_tqdm=False)[0] for messages in turns]
    else:
        outputs = llm.chat(turns, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    return sum(map(len, token_ids)) / elapsed, token_ids


def run_random(llm, at_once: int, prompt_len: int, max_tokens: int, seed: int) -> tuple[float, list]:
    from pagedserve import SamplingParams

    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(prompt_len)]} for _ in range(at_once)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    return at_once * max_tokens / elapsed, [list(o.outputs[0].token_ids) for o in outputs]


def vllm_worker(model: str, method: str, plan: list[list[int]], max_tokens: int) -> None:
    """Under vLLM's Python: run each (at once, first turn, number of turns) of `plan` and print one JSON line of
    [tok/s, drafts, drafted tokens, accepted tokens] per entry."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="bfloat16", max_model_len=2048, speculative_config=METHODS[method],
              disable_log_stats=False)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    trace = AgentTrace()
    llm.generate([{"prompt_token_ids": [100] * 16}], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)

    def counters() -> list[float]:
        values = {m.name: getattr(m, "value", 0) for m in llm.get_metrics()}
        return [values.get(f"vllm:spec_decode_num_{name}", 0) for name in ("drafts", "draft_tokens", "accepted_tokens")]

    results = []
    for at_once, first, count in plan:
        before = counters()
        speed, _ = run_trace(llm, [trace.turn(COPY, first + i) for i in range(count)], at_once, params)
        results.append([speed, *(a - b for a, b in zip(counters(), before))])
    print("RESULTS " + json.dumps(results), flush=True)


def run_vllm(method: str, plan: list[list[int]], max_tokens: int) -> list[list[float]]:
    import peers

    python = os.path.join(peers.setup_vllm(), "bin", "python")
    command = [python, os.path.abspath(__file__), "--vllm-worker", method, "--model", peers.export_hf_dir(),
               "--plan", json.dumps(plan), "--max-tokens", str(max_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **peers.VLLM_ENV},
                            timeout=3600)
    for line in result.stdout.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS "):])
    raise RuntimeError(f"vLLM ({method}) failed ({result.returncode}):\n{result.stderr[-3000:]}")


def vllm_comparison(levels: tuple[int, ...], rounds: int, first_turn: int, max_tokens: int,
                    sequential_turns: int) -> list[str]:
    """vLLM's agent-trace figures, ngram against none, as the section's lines (or why there are none)."""
    plans = []
    for _ in range(rounds):
        plan = []
        for n in levels:
            count = sequential_turns if n == 1 else n
            plan.append([n, first_turn, count])
            first_turn += count
        plans.append(plan)
    figures: dict[str, list[list[list[float]]]] = {"none": [], "ngram": []}
    try:
        for plan in plans:
            for method in figures:
                wait_for_quiet(600)
                figures[method].append(run_vllm(method, plan, max_tokens))
                log(f"vLLM {method}: {figures[method][-1]}")
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        log(f"vLLM did not run: {e}")
        return [f"vLLM's CPU build with the same ngram `speculative_config`: it did not run here: "
                f"`{str(e).strip().splitlines()[-1][:300]}`"]
    rows = []
    for i, n in enumerate(levels):
        base = statistics.median(r[i][0] for r in figures["none"])
        for method, runs in figures.items():
            speeds = [r[i][0] for r in runs]
            drafts, drafted, accepted = (sum(r[i][j] for r in runs) for j in (1, 2, 3))
            rows.append([n, method, " / ".join(f"{v:.1f}" for v in speeds), f"{statistics.median(speeds):.1f}",
                         f"{statistics.median(speeds) / base:.2f}x", f"{accepted / drafted:.0%}" if drafted else "-",
                         f"{1 + accepted / drafts:.2f}" if drafts else "-"])
    return ["vLLM's CPU build on the same copy-heavy agent turns (bf16 weights of the same model; rounds interleaved "
            "with a process per method, after pagedserve's rounds):", "",
            markdown_table(["at once", "method", "tok/s per round", "median tok/s", "vs none", "acceptance",
                            "accepted length"], rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="rewrite this file's speculative section")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--vllm", action="store_true", help="vLLM's CPU build on the agent trace too")
    parser.add_argument("--vllm-worker", choices=["none", "ngram"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_worker:
        vllm_worker(args.model, args.vllm_worker, json.loads(args.plan), args.max_tokens)
        return
    from pagedserve import LLM, SamplingParams
    copy_levels = (1, 4) if args.quick else (1, 4, 16, 64)
    chat_levels = (1,) if args.quick else (1, 16)
    random_levels = (1, 4) if args.quick else (1, 16, 64, 256)
    max_tokens = 16 if args.quick else 128
    random_tokens = 8 if args.quick else 32
    rounds = 1 if args.quick else 2
    trace = AgentTrace()
    sequential_turns = 2 if args.quick else 4  # at 1 at once: one of each kind, one after another
    machine = machine_description()
    started = time.monotonic()

    engines = {name: LLM(speculative_config=spec, kv_cache_memory_bytes=1 << 30) for name, spec in METHODS.items()}
    for llm in engines.values():  # warm up
        run_random(llm, 2, 16, 4, seed=-1)

    workloads = ([(COPY, n) for n in copy_levels] + [(CHAT, n) for n in chat_levels]
                 + [(RANDOM, n) for n in random_levels])
    tok_s: dict[tuple[str, int, str], list[float]] = {}
    same: dict[tuple[str, int, str], bool] = {}
    acceptance: dict[tuple[str, int, str], tuple[float, float]] = {}
    loads: list[list[object]] = []
    next_turn = {COPY: 0, CHAT: 0}  # every engine gets the same turns; none gets a turn twice
    for workload, n in workloads:
        for r in range(rounds):
            turns = []
            if workload != RANDOM:
                count = sequential_turns if n == 1 else n
                turns = [trace.turn(workload, next_turn[workload] + i) for i in range(count)]
                next_turn[workload] += len(turns)
            wait_for_quiet(600)
            meter = OtherLoadMeter().start()
            reference = None
            for name, llm in engines.items():
                before = llm.stats()
                if workload != RANDOM:
                    speed, token_ids = run_trace(llm, turns, n, SamplingParams(temperature=0, max_tokens=max_tokens))
                else:
                    speed, token_ids = run_random(llm, n, 128, random_tokens, seed=1000 * n + r)
                after = llm.stats()
                key = (workload, n, name)
                tok_s.setdefault(key, []).append(speed)
                reference = token_ids if reference is None else reference
                same[key] = same.get(key, True) and token_ids == reference
                drafts = after.spec_num_drafts - before.spec_num_drafts
                drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
                accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
                if drafts:
                    acceptance[key] = (accepted / drafted, 1 + accepted / drafts)
                log(f"{workload}, {n} at once, round {r + 1}, {name}: {speed:.1f} tok/s, {drafts} drafts, "
                    f"{accepted}/{drafted} accepted")
            loads.append([workload, n, r + 1, meter.stop().label()])

    rows = []
    for workload, n in workloads:
        base = statistics.median(tok_s[(workload, n, "none")])
        for name in METHODS:
            key = (workload, n, name)
            rate, length = acceptance.get(key, (None, None))
            rows.append([workload, n, name, " / ".join(f"{v:.1f}" for v in tok_s[key]),
                         f"{statistics.median(tok_s[key]):.1f}", f"{statistics.median(tok_s[key]) / base:.2f}x",
                         "-" if rate is None else f"{rate:.0%}", "-" if length is None else f"{length:.2f}",
                         "yes" if same[key] else "**no**"])
    def ratio(workload: str, n: int, method: str) -> float:
        return statistics.median(tok_s[(workload, n, method)]) / statistics.median(tok_s[(workload, n, "none")])

    goals = []
    for method in ("ngram", "suffix"):
        for n, target in ((1, 2.0), (16, 1.5)):
            if n in copy_levels:
                goals.append([f"{method}: copy-heavy agent turns, {n} at once >= {target}x no speculation",
                              f"{ratio(COPY, n, method):.2f}x", verdict(ratio(COPY, n, method) >= target)])
        worst = min(ratio(RANDOM, n, method) for n in random_levels)
        goals.append([f"{method}: random prompts (drafts never hit) >= 0.95x at every level", f"worst {worst:.2f}x",
                      verdict(worst >= 0.95)])
        identical = all(same[(w, n, method)] for w, n in workloads)
        goals.append([f"{method}: greedy outputs identical to no speculation", "yes" if identical else "no",
                      verdict(identical)])
    minutes = (time.monotonic() - started) / 60
    settings = ", ".join(f"{name}: `{json.dumps(spec)}`" for name, spec in METHODS.items() if spec)
    body = "\n".join([
        "## Speculative decoding: n-gram and suffix drafts", "",
        *section_intro("speculative.py", args.quick, minutes, __doc__.split("\n\n")[2], machine),
        f"Settings: {settings}; adaptive defaults (a request's drafts shrink when they miss and pause when they keep "
        "missing; a step's decode and drafted tokens stay within 32; no drafts in a step of more than 64 requests). "
        f"Copy-heavy turns: each kind in turn ({', '.join(AgentTrace.COPY_KINDS)}); chat "
        f"turns: a story, a description or a poem on a topic; {sequential_turns} one after another at 1 at once, at "
        f"most {max_tokens} output tokens each. "
        f"Random prompts: 128 random token ids, {random_tokens} output "
        "tokens (ignore_eos). Acceptance: drafted tokens accepted; accepted length: tokens per verifying step.", "",
        markdown_table(["workload", "at once", "method", "tok/s per round", "median tok/s", "vs none", "acceptance",
                        "accepted length", "same tokens"], rows), "",
        "Goals (medians):", "",
        markdown_table(["goal", "measured", "verdict"], goals), "",
        *(vllm_comparison(tuple(n for n in copy_levels if n in (1, 16)), rounds, next_turn[COPY], max_tokens,
                          sequential_turns) if args.vllm else
          ["vLLM's CPU build with the same `speculative_config`: not run (without --vllm)."]), "",
        markdown_table(["workload", "at once", "round", "rest of the machine during the round"], loads),
    ])
    print(body)
    if args.output:
        replace_section(args.output, "speculative", body)


if __name__ == "__main__":
    main()
