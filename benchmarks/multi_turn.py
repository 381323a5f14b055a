"""The agent-shaped workload through the OpenAI server, with prefix caching on and off (issue #4).

    python benchmarks/multi_turn.py [--output BENCHMARKS.md] [--quick]

32 concurrent sessions share a 1,000-token system prompt (instructions and tool definitions); each runs
8 turns, and each turn appends a user message or a tool result of 50-200 tokens to its history, then
generates 50-150 tokens (`ignore_eos`, `max_tokens`) with `/v1/chat/completions`; the reply joins the history
as an assistant message. The workload is drawn from a fixed seed, so every run sends the same messages.
The prefix-cache hit rate and the prompt tokens actually computed come from the server's `/metrics`
(vLLM's metric names, which pagedserve also uses), read before and after the run.

Writes the `multi-turn` section of the output file; `peers.py` runs the same workload against vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass

import httpx
from common import QUICK_WARNING, OtherLoadMeter, log, machine_description, markdown_table, wait_for_quiet
from report import replace_section
from serving import PAGEDSERVE_FLAGS, REPO, ServerProcess, free_port, pagedserve_command
from tqdm import tqdm

from pagedserve.benchmarks import serve

TOOLS = [
    {"name": "read_file", "description": "Read a text file of the repository.",
     "parameters": {"path": {"type": "string", "description": "path relative to the repository root"},
                    "start_line": {"type": "integer"}, "end_line": {"type": "integer"}}},
    {"name": "write_file", "description": "Create or overwrite a file with the given content.",
     "parameters": {"path": {"type": "string"}, "content": {"type": "string"}}},
    {"name": "run_shell", "description": "Run a shell command in the sandbox and return its output.",
     "parameters": {"command": {"type": "string"}, "timeout_s": {"type": "integer", "default": 60}}},
    {"name": "search_code", "description": "Search the repository for a regular expression.",
     "parameters": {"pattern": {"type": "string"}, "glob": {"type": "string", "default": "**/*.py"}}},
    {"name": "fetch_url", "description": "Fetch a web page and return its text.",
     "parameters": {"url": {"type": "string"}}},
]
SYSTEM_HEAD = (
    "You are a careful software agent working in a sandboxed repository. Think step by step, call one tool "
    "at a time, and answer with a short summary when the task is done. To call a tool, reply with a JSON "
    'object {"tool": NAME, "arguments": {...}}. The tools:\n'
    + json.dumps(TOOLS, indent=1)
    + "\nNotes on the project follow.\n"
)
METRIC_QUERIES = "vllm:prefix_cache_queries_total"
METRIC_HITS = "vllm:prefix_cache_hits_total"


@dataclass(frozen=True)
class Workload:
    sessions: int = 32
    turns: int = 8
    system_tokens: int = 1000
    message_tokens: tuple[int, int] = (50, 200)  # each turn's user message or tool result, uniform, inclusive
    output_tokens: tuple[int, int] = (50, 150)  # each turn's reply
    seed: int = 0

    @classmethod
    def quick(cls) -> Workload:
        return cls(sessions=4, turns=3, system_tokens=600, message_tokens=(20, 40), output_tokens=(8, 16))


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "tool"
    content: str
    max_tokens: int


def build_sessions(tokenizer, workload: Workload) -> tuple[str, list[list[Turn]]]:
    """The shared system prompt and every session's turns; the same for the same seed and tokenizer.

    Turn 1 is the user's task; later turns alternate a tool result and a user follow-up.
    """
    rng = random.Random(workload.seed)
    random_text = serve.RandomText(tokenizer)
    head_tokens = len(tokenizer.encode(SYSTEM_HEAD, add_special_tokens=False))
    if head_tokens >= workload.system_tokens:
        raise ValueError(f"system_tokens must exceed the {head_tokens} tokens of the instructions and tools")
    system = SYSTEM_HEAD + random_text(workload.system_tokens - head_tokens, rng)
    sessions = [
        [Turn("tool" if t % 2 else "user", random_text(rng.randint(*workload.message_tokens), rng),
              rng.randint(*workload.output_tokens)) for t in range(workload.turns)]
        for _ in range(workload.sessions)
    ]
    return system, sessions


async def _run(base_url: str, workload: Workload, tokenizer_path: str | None, show_progress: bool,
               session_ids: bool = False) -> dict:
    base_url = base_url.rstrip("/")
    url = f"{base_url}/v1/chat/completions"
    timeout = httpx.Timeout(3600.0, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = await serve.served_model(client, base_url)
        system, sessions = build_sessions(serve.load_tokenizer(tokenizer_path), workload)

        def payload(messages: list[dict], max_tokens: int, session: str) -> dict:
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            return {**body, "session_id": session} if session_ids else body

        warmup = await serve.stream_request(client, url, payload([{"role": "user", "content": "Hi"}], 4, "warm-up"),
                                            chat=True)
        if not warmup.success:
            raise RuntimeError(f"warm-up request to {url} failed: {warmup.error}")
        bar = tqdm(total=workload.sessions * workload.turns, desc="turns", disable=not show_progress,
                   file=sys.stderr)

        async def session(index: int, turns: list[Turn]) -> list[serve.RequestResult]:
            messages, results = [{"role": "system", "content": system}], []
            for i, turn in enumerate(turns):
                message = {"role": turn.role, "content": turn.content}
                if turn.role == "tool":
                    message["tool_call_id"] = f"call_{i}"
                messages.append(message)
                result = await serve.stream_request(client, url, payload(list(messages), turn.max_tokens,
                                                                         f"session-{index}"), chat=True)
                if not result.success:
                    raise RuntimeError(f"session {index} turn {i + 1} failed: {result.error}")
                messages.append({"role": "assistant", "content": result.text})
                results.append(result)
                bar.update(1)
            return results

        before = await serve.fetch_metrics(client, base_url)
        start = time.perf_counter()
        per_session = await asyncio.gather(*(session(i, turns) for i, turns in enumerate(sessions)))
        seconds = time.perf_counter() - start
        after = await serve.fetch_metrics(client, base_url)
        bar.close()

    def delta(name: str) -> float | None:
        return after[name] - before.get(name, 0.0) if name in after else None

    prompt_tokens = sum(r.prompt_tokens or 0 for results in per_session for r in results)
    output_tokens = sum(r.output_tokens for results in per_session for r in results)
    queries, hits = delta(METRIC_QUERIES), delta(METRIC_HITS)
    ttft_by_turn = []
    for t in range(workload.turns):
        stats = serve.Stats.of([results[t].ttft for results in per_session])
        ttft_by_turn.append({"turn": t + 1, "mean_ms": stats.mean, "p99_ms": stats.p99})
    return {
        "model": model,
        "workload": asdict(workload),
        "total_s": seconds,
        "requests": workload.sessions * workload.turns,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_throughput": output_tokens / seconds,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "hit_rate": hits / queries if queries else None,
        "computed_prompt_tokens": prompt_tokens - (hits or 0) if hits is not None else None,
        "ttft_by_turn": ttft_by_turn,
    }


def run_workload(base_url: str, workload: Workload, tokenizer_path: str | None = None,
                 show_progress: bool = True, max_quiet_wait_s: float = 300.0, session_ids: bool = False) -> dict:
    """Run the whole workload against the server at `base_url`; the measurements as a JSON-ready dict. It
    first waits (bounded) for the rest of the machine to be quiet, and records what it used meanwhile.

    `tokenizer_path` (HF directory or .gguf) sizes the messages; None: the default SmolLM2 model's. With
    `session_ids`, each request carries its session's `session_id` (`session-{index}`).
    """
    wait_for_quiet(max_quiet_wait_s)
    meter = OtherLoadMeter().start()
    result = asyncio.run(_run(base_url, workload, tokenizer_path, show_progress, session_ids))
    result["machine"] = meter.stop().label()
    hit_rate = "-" if result["hit_rate"] is None else f"{100 * result['hit_rate']:.1f}%"
    log(f"  {result['total_s']:.1f} s, {result['output_throughput']:,.1f} out tok/s, hit rate {hit_rate}")
    return result


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def _turn_ratio(result: dict) -> float:
    """Mean TTFT of the last turn / of the first."""
    turns = result["ttft_by_turn"]
    return turns[-1]["mean_ms"] / turns[0]["mean_ms"]


def report_tables(runs: dict[str, dict]) -> str:
    """A summary table (one column per run) and the TTFT of every turn index."""
    last = next(iter(runs.values()))["workload"]["turns"]

    def per_run(fn) -> list[str]:
        return [fn(r) for r in runs.values()]

    def count(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    summary = [
        ["total time (s)", *per_run(lambda r: f"{r['total_s']:.1f}")],
        ["output tokens/s", *per_run(lambda r: f"{r['output_throughput']:,.1f}")],
        ["requests", *per_run(lambda r: str(r["requests"]))],
        ["prompt tokens (usage)", *per_run(lambda r: count(r["prompt_tokens"]))],
        ["prefix-cache hits (tokens)", *per_run(lambda r: count(r["prefix_cache_hits"]))],
        ["prefix-cache hit rate", *per_run(lambda r: "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%")],
        ["prompt tokens computed", *per_run(lambda r: count(r["computed_prompt_tokens"]))],
        ["TTFT turn 1, mean / p99 (ms)", *per_run(lambda r: _ttft(r["ttft_by_turn"][0]))],
        [f"TTFT turn {last}, mean / p99 (ms)", *per_run(lambda r: _ttft(r["ttft_by_turn"][-1]))],
        [f"TTFT turn {last} / turn 1 (means)", *per_run(lambda r: f"{_turn_ratio(r):.2f}x")],
        ["rest of the machine during the run", *per_run(lambda r: r.get("machine", "-"))],
    ]
    turns = [[str(t + 1), *per_run(lambda r, t=t: _ttft(r["ttft_by_turn"][t]))] for t in range(last)]
    return "\n\n".join([
        markdown_table(["", *runs], summary),
        "TTFT by turn index, mean / p99 (ms):",
        markdown_table(["turn", *runs], turns),
    ])


def _ttft(turn: dict) -> str:
    return f"{turn['mean_ms']:,.0f} / {turn['p99_ms']:,.0f}"


def goal_rows(cached: dict, vllm: dict | None = None) -> list[list[str]]:
    """Issue #4's goals for the run with prefix caching on (and against vLLM's run, when there is one)."""
    ratio, last = _turn_ratio(cached), cached["ttft_by_turn"][-1]["turn"]
    rows = [[f"with caching, turn-{last} TTFT within 1.5x of turn 1 (means)", f"{ratio:.2f}x", ratio <= 1.5]]
    if cached["hit_rate"] is not None:
        rows.append(["prefix-cache hit rate above 85%", f"{100 * cached['hit_rate']:.1f}%", cached["hit_rate"] > 0.85])
    if vllm is not None:
        speedup = vllm["total_s"] / cached["total_s"]
        rows.append(["agent workload total time >= 1.25x better than vLLM's", f"{speedup:.2f}x", speedup >= 1.25])
    return [[goal, measured, "met" if met else "**not met**"] for goal, measured, met in rows]


def workload_text(workload: Workload) -> str:
    w = workload
    return (f"{w.sessions} concurrent sessions x {w.turns} turns; shared system prompt of {w.system_tokens} tokens "
            f"(instructions, {len(TOOLS)} tool definitions, filler); each turn appends a user message or a tool "
            f"result of {w.message_tokens[0]}-{w.message_tokens[1]} tokens and generates {w.output_tokens[0]}-"
            f"{w.output_tokens[1]} tokens (`ignore_eos`, greedy, streamed); seed {w.seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=f"{REPO}/BENCHMARKS.md",
                        help="Markdown file whose `multi-turn` section is rewritten")
    parser.add_argument("--quick", action="store_true", help="a tiny workload, to check the script")
    args = parser.parse_args()
    workload = Workload.quick() if args.quick else Workload()

    start = time.monotonic()
    runs = {}
    for label, flag in (("prefix caching on", "--enable-prefix-caching"),
                        ("prefix caching off", "--no-enable-prefix-caching")):
        port = free_port()
        with ServerProcess(f"pagedserve-{flag[2:]}", pagedserve_command(port, flag), port) as server:
            log(f"multi-turn workload: pagedserve, {label}")
            runs[label] = run_workload(server.base_url, workload, show_progress=not args.quick)
    lines = [
        "## Multi-turn agent workload: prefix caching on and off",
        "",
        f"Generated by `python benchmarks/multi_turn.py{' --quick' if args.quick else ''}` in "
        f"{(time.monotonic() - start) / 60:.1f} min (part of `make bench`), through `pagedserve serve` "
        "and `/v1/chat/completions`; `make bench-peers` runs the same workload against vLLM.",
        "",
    ]
    if args.quick:
        lines += [QUICK_WARNING, ""]
    lines += [
        markdown_table(["", ""], [
            *machine_description(),
            ("Server", f"`pagedserve serve {' '.join(PAGEDSERVE_FLAGS)} --[no-]enable-prefix-caching`"),
            ("Workload", workload_text(workload)),
        ]),
        "",
        report_tables(runs),
        "",
        markdown_table(["goal", "measured", ""], goal_rows(runs["prefix caching on"])),
    ]
    body = "\n".join(lines)
    replace_section(args.output, "multi-turn", body)
    print(body)


if __name__ == "__main__":
    main()
