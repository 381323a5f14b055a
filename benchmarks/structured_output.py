"""Structured-output cost: output tok/s of requests that are all JSON-schema constrained against the same
requests unconstrained, at 1, 16 and 64 at once, both grammar backends, with and without filling the bitmask
while the forward runs; and grammar compile times (cold, a new schema, cached).

    python benchmarks/structured_output.py [--output BENCHMARKS.md] [--quick]

Offline, through `LLM.chat` on the default model (SmolLM2-135M-Instruct, bf16 where the CPU has it), greedy.
The schema asks for at least 64 landmarks, so no constrained output can end before max_tokens: every variant
generates exactly the same number of tokens per request, and tok/s compares the per-token cost only. Variants
run interleaved (A B C D E, then again) in one process; the table gives each round and the median.
"No overlap" fills the bitmask on the engine thread before the forward instead of on its own thread.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time

from common import (
    OtherLoadMeter,
    log,
    machine_description,
    markdown_table,
    section_intro,
    verdict,
    wait_for_quiet,
)
from report import replace_section

from pagedserve import LLM, SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string"}, "minItems": 64},
    },
    "required": ["name", "country", "population", "landmarks"],
}
OTHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"]}
VARIANTS = ("unconstrained", "xgrammar", "xgrammar, no overlap", "guidance", "guidance, no overlap")


class InlineExecutor(concurrent.futures.Executor):
    """Runs a submitted fill at once, on the caller's thread: the bitmask without the overlap."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def messages(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Describe city number {i} as JSON: its name, country, population and "
              "landmarks."}] for i in range(n)]


def run(llm: LLM, n: int, max_tokens: int, constrained: bool) -> tuple[float, int]:
    """(output tok/s, tokens) of n requests at once."""
    structured = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=not constrained,
                            structured_outputs=structured)
    start = time.perf_counter()
    outputs = llm.chat(messages(n), params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs), "an output ended early"
    return tokens / elapsed, tokens


def compile_times(llm: LLM, backend: str) -> dict[str, float]:
    """ms: the first compile (backend set-up: tokenizer tables), a new schema, the same schema again."""
    manager = llm.engine.structured_output
    timings = {}
    start = time.perf_counter()
    manager._backend(backend).compile(StructuredOutputsParams(json=SCHEMA))
    timings["cold"] = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    manager._backend(backend).compile(StructuredOutputsParams(json=OTHER_SCHEMA))
    timings["new schema"] = (time.perf_counter() - start) * 1e3
    params = StructuredOutputsParams(json=OTHER_SCHEMA)
    manager.validate(params)
    llm.generate("x", SamplingParams(max_tokens=1, structured_outputs=params), use_tqdm=False)  # cache it
    start = time.perf_counter()
    llm.generate("x", SamplingParams(max_tokens=1, structured_outputs=params), use_tqdm=False)
    timings["cached (a 1-token request)"] = (time.perf_counter() - start) * 1e3
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="rewrite this file's structured-output section")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    args = parser.parse_args()
    levels = (1, 4) if args.quick else (1, 16, 64)
    max_tokens = 16 if args.quick else 128
    rounds = 1 if args.quick else 2
    machine = machine_description()
    started = time.monotonic()

    engines = {name: LLM(structured_outputs_config={"backend": name}, kv_cache_memory_bytes=1 << 30)
               for name in ("xgrammar", "guidance")}
    compiles = {name: compile_times(llm, name) for name, llm in engines.items()}
    overlapped = {name: llm.engine.structured_output._fill_pool for name, llm in engines.items()}

    def measure(variant: str, n: int) -> float:
        backend = "xgrammar" if variant == "unconstrained" else variant.split(",")[0]
        llm = engines[backend]
        manager = llm.engine.structured_output
        manager._fill_pool = InlineExecutor() if "no overlap" in variant else overlapped[backend]
        return run(llm, n, max_tokens, variant != "unconstrained")[0]

    for llm in engines.values():  # warm up: kernels, grammar caches
        run(llm, 2, 8, True)
        run(llm, 2, 8, False)
    results: dict[tuple[int, str], list[float]] = {}
    machine_load: dict[int, list[str]] = {}
    for n in levels:
        for r in range(rounds):
            wait_for_quiet(600)
            meter = OtherLoadMeter().start()
            for variant in VARIANTS:
                tok_s = measure(variant, n)
                results.setdefault((n, variant), []).append(tok_s)
                log(f"{n} at once, round {r + 1}, {variant}: {tok_s:.1f} tok/s")
            machine_load.setdefault(n, []).append(meter.stop().label())

    rows = []
    for n in levels:
        base = statistics.median(results[(n, "unconstrained")])
        for variant in VARIANTS:
            values = results[(n, variant)]
            rows.append([n, variant, " / ".join(f"{v:.1f}" for v in values), f"{statistics.median(values):.1f}",
                         f"{statistics.median(values) / base:.0%}"])
    table = markdown_table(["at once", "variant", "tok/s per round", "median tok/s", "vs unconstrained"], rows)
    goal_rows = []
    for n in levels:
        base = statistics.median(results[(n, "unconstrained")])
        for variant in VARIANTS[1:]:
            share = statistics.median(results[(n, variant)]) / base
            goal_rows.append([f"{n} at once, {variant}: constrained >= 90% of unconstrained", f"{share:.0%}",
                              verdict(share >= 0.9)])
    machine_table = markdown_table(["at once", "round", "rest of the machine during the round's variants"],
                                   [[n, r + 1, label] for n, labels in machine_load.items()
                                    for r, label in enumerate(labels)])
    compile_rows = [[name, *(f"{t[k]:.1f}" for k in ("cold", "new schema", "cached (a 1-token request)"))]
                    for name, t in compiles.items()]
    compile_table = markdown_table(["backend", "first compile (set-up + compile), ms", "a new schema, ms",
                                    "cached: a whole 1-token request, ms"], compile_rows)
    minutes = (time.monotonic() - started) / 60
    body = "\n".join([
        "## Structured output", "",
        *section_intro("structured_output.py", args.quick, minutes, __doc__.split("\n\n")[2], machine),
        f"Output tok/s, {max_tokens} tokens per request, default model, greedy; the constrained requests follow a "
        "JSON schema (an object with a string array of at least 64 items).", "",
        table, "",
        "Goal: constrained >= 90% of unconstrained at every level (medians):", "",
        markdown_table(["goal", "measured", "verdict"], goal_rows), "",
        machine_table, "",
        "Grammar compile time for that schema (tokenizer: SmolLM2's 49,152 tokens):", "",
        compile_table,
    ])
    print(body)
    if args.output:
        replace_section(args.output, "structured-output", body)


if __name__ == "__main__":
    main()
