"""Speculative decoding: output tok/s with model-free drafts (vLLM's `ngram` and `suffix` methods) against none, on
an agent trace whose answers restate their context and on random prompts where drafts never hit.

    python benchmarks/speculative.py [--output BENCHMARKS.md] [--quick]

Offline, through `LLM.chat` / `LLM.generate` on the default model (SmolLM2-135M-Instruct, its Q4_1 GGUF kept
quantized), greedy, so every method generates the same tokens (checked: the table says whether the outputs were
identical) and tok/s compares time per token. The agent trace is made from real text (this repository's README and
Python's own `json` module source) and JSON records: turns that re-emit a record with one field changed, call a tool
with arguments taken from its result, rewrite a function with a rename, quote a paragraph; plus open-ended chat turns.
At 1 request at once each turn runs alone, one after another; at N > 1, N turns (the trace cycled) run at once.
Methods run interleaved (none, ngram, suffix, then again) in one process; each round and the median.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import statistics
import time

from common import OtherLoadMeter, log, machine_description, markdown_table, section_intro, verdict, wait_for_quiet
from report import REPO, replace_section

from pagedserve import LLM, SamplingParams

METHODS: dict[str, dict | None] = {
    "none": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
    "suffix": {"method": "suffix"},  # vLLM's defaults: drafts of up to 24 tokens, sized by their probability
}
RECORD = {"id": 4312, "name": "Acme Corporation", "email": "billing@acme.example", "plan": "enterprise",
          "seats": 250, "renewal": "2027-03-01", "owner": {"name": "Jane Doe", "phone": "+1-555-0100"}}
WEATHER = {"location": {"city": "Lisbon", "country": "PT", "lat": 38.7223, "lon": -9.1393},
           "forecast": [{"date": "2026-12-08", "high_c": 17, "low_c": 11, "summary": "light rain"},
                        {"date": "2026-12-09", "high_c": 16, "low_c": 10, "summary": "cloudy"}]}


def readme_paragraph() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        paragraphs = [p for p in f.read().split("\n\n") if len(p) > 300 and not p.startswith(("```", "|", "#"))]
    return paragraphs[0][:900]


def agent_trace() -> list[tuple[str, list[dict]]]:
    """(kind, messages) of each turn."""
    source = inspect.getsource(json.dumps)[:1200]
    copy_turns = [
        ("JSON record, one field changed", "Here is a customer record:\n" + json.dumps(RECORD, indent=2)
         + "\nReturn the record exactly as JSON, with seats changed to 300."),
        ("tool call from a tool result", "The weather tool returned:\n" + json.dumps(WEATHER, indent=2)
         + '\nCall the tool `book_umbrella` with the JSON arguments {"city": ..., "lat": ..., "lon": ...} taken from '
           "this result. Answer with the JSON arguments only."),
        ("function rewritten with a rename", "Rewrite this Python function, renaming the parameter `obj` to "
         "`value` everywhere, and change nothing else:\n\n" + source),
        ("quoted summary", "Quote the following paragraph word for word, then add one sentence that sums it up:\n\n"
         + readme_paragraph()),
    ]
    chat_turns = [
        ("open-ended chat", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
        ("open-ended chat", "What are three good habits for learning a new programming language? Explain each."),
    ]
    return [(kind, [{"role": "user", "content": text}]) for kind, text in copy_turns + chat_turns]


def run_trace(llm: LLM, trace: list[tuple[str, list[dict]]], at_once: int, max_tokens: int) -> tuple[float, list]:
    """(output tok/s, the outputs' token ids)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    if at_once == 1:
        outputs = [llm.chat(messages, params, use_tqdm=False)[0] for _, messages in trace]
    else:
        turns = [trace[i % len(trace)][1] for i in range(at_once)]
        outputs = llm.chat(turns, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    return sum(map(len, token_ids)) / elapsed, token_ids


def run_random(llm: LLM, at_once: int, prompt_len: int, max_tokens: int) -> tuple[float, list]:
    rng = random.Random(at_once)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(prompt_len)]} for _ in range(at_once)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    return at_once * max_tokens / elapsed, [list(o.outputs[0].token_ids) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="rewrite this file's speculative section")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    args = parser.parse_args()
    trace_levels = (1, 4) if args.quick else (1, 4, 16, 64)
    random_levels = (1, 4) if args.quick else (1, 16, 64, 256)
    max_tokens = 16 if args.quick else 128
    random_tokens = 8 if args.quick else 32
    rounds = 1 if args.quick else 2
    trace = agent_trace()[: 2 if args.quick else None]
    machine = machine_description()
    started = time.monotonic()

    engines = {name: LLM(speculative_config=spec, kv_cache_memory_bytes=1 << 30) for name, spec in METHODS.items()}
    for llm in engines.values():  # warm up
        run_trace(llm, trace[:1], 1, 8)

    workloads = [("agent trace", n) for n in trace_levels] + [("random prompts", n) for n in random_levels]
    tok_s: dict[tuple[str, int, str], list[float]] = {}
    same: dict[tuple[str, int, str], bool] = {}
    acceptance: dict[tuple[str, int, str], tuple[float, float]] = {}
    loads: list[list[object]] = []
    for workload, n in workloads:
        for r in range(rounds):
            wait_for_quiet(600)
            meter = OtherLoadMeter().start()
            reference = None
            for name, llm in engines.items():
                before = llm.stats()
                if workload == "agent trace":
                    speed, token_ids = run_trace(llm, trace, n, max_tokens)
                else:
                    speed, token_ids = run_random(llm, n, 128, random_tokens)
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
            if n in trace_levels:
                goals.append([f"{method}: agent trace, {n} at once >= {target}x no speculation",
                              f"{ratio('agent trace', n, method):.2f}x",
                              verdict(ratio("agent trace", n, method) >= target)])
        worst = min(ratio("random prompts", n, method) for n in random_levels)
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
        f"Settings: {settings}; adaptive defaults (drafting pauses for a request whose drafts miss, and for a step of "
        f"more than 64 requests). Agent trace: {len(trace)} turns ({', '.join(sorted({k for k, _ in trace}))}), "
        f"at most {max_tokens} output tokens each. Random prompts: 128 random token ids, {random_tokens} output "
        "tokens (ignore_eos). Acceptance: drafted tokens accepted; accepted length: tokens per verifying step.", "",
        markdown_table(["workload", "at once", "method", "tok/s per round", "median tok/s", "vs none", "acceptance",
                        "accepted length", "same tokens"], rows), "",
        "Goals (medians):", "",
        markdown_table(["goal", "measured", "verdict"], goals), "",
        "vLLM's CPU build with the same `speculative_config`: not run here (not installed on this machine).", "",
        markdown_table(["workload", "at once", "round", "rest of the machine during the round"], loads),
    ])
    print(body)
    if args.output:
        replace_section(args.output, "speculative", body)


if __name__ == "__main__":
    main()
