"""Agent sessions that pause for tools, under KV-memory pressure: session leases on and off, scheduling
policies, and vLLM on the same pool (issue #11).

    python benchmarks/agent_sessions.py [--output BENCHMARKS.md] [--quick] [--engines pagedserve vllm] [--rounds N]

Why: `multi_turn.py` sends each turn as soon as the previous reply is in, with a KV pool that holds every
history at once. Real agents do neither: between two turns the session waits while a tool runs (a test
suite, a web fetch: seconds, with a long tail), and a busy server cannot keep every paused history in memory.
A paused session's KV then competes with the running ones; if it is gone when the session comes back, the
next turn recomputes the whole history. pagedserve keeps a paused session's KV warm with a lease (a TTL
picked from the session's observed pauses) and can schedule by program (the session with the least service
so far first); this benchmark measures what that buys, and what it costs when memory is plentiful.

The workload, drawn from a fixed seed (the same messages in every run):
- S concurrent sessions (48) of T turns (10), their starts staggered over the first seconds;
- a shared system prompt of ~600 tokens (instructions and tool definitions: in the system prompt, so both
  engines render the same text, since SmolLM2's chat template has no tools section) and a ~100-token task;
- every turn is a streamed `/v1/chat/completions` request of the whole history, greedy, `ignore_eos`,
  `max_tokens` 40-80; then the session sleeps a tool pause (lognormal: median 1 s, p90 6 s) and appends the
  reply and a tool result of 100-400 tokens (a user turn holding a hermes `<tool_response>` block);
- pagedserve requests carry `session_id` (and `kv_retention_s: 0` for "leases off"); each session is closed
  (`POST /v1/sessions/{id}/close`) after its last turn.

Memory pressure: both engines get a KV pool of about half of all the sessions' final histories (in tokens,
the same in both: pagedserve `--num-kv-blocks`, vLLM `--num-gpu-blocks-override` at its CPU block size of
128 tokens). Variants, one server at a time (rounds interleaved): pagedserve leases off / on with fcfs, on /
off with `--scheduling-policy session`, vLLM; then, with a pool that holds everything, leases off vs on.

Measured per variant: sessions completed per minute, TTFT by turn, prompt tokens recomputed (prefix-cache
queries - hits, from `/metrics` deltas), preemptions, and pagedserve's lease counters. Writes the
`agent-sessions` section of the output file.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass

import httpx
import multi_turn
import peers
from common import (
    QUICK_WARNING,
    QUIET_OTHER_CORES,
    OtherLoadMeter,
    log,
    machine_description,
    markdown_table,
    wait_for_quiet,
)
from report import replace_section
from serving import PAGEDSERVE_FLAGS, REPO, ServerProcess, free_port, pagedserve_command
from tqdm import tqdm

from pagedserve.benchmarks import serve

PAGEDSERVE_BLOCK = 16  # pagedserve's default block size, in tokens
VLLM_BLOCK = 128  # vLLM's CPU block size (its default there)
POOL_QUANTUM = math.lcm(PAGEDSERVE_BLOCK, VLLM_BLOCK)  # pools are whole blocks in both engines
PRESSURE_FRACTION = 0.5  # the pressure pool: this share of all the final histories
ROOMY_FRACTION = 1.25  # the no-pressure pool: all the final histories and some room
MAX_NUM_SEQS = "256"  # above the session count in both servers
SAMPLE_METRICS_S = 1.0  # how often the gauges are read during a run (for their peaks)

Q = "vllm:prefix_cache_queries_total"
H = "vllm:prefix_cache_hits_total"
PREEMPTIONS = "vllm:num_preemptions_total"
LEASE_HITS = "pagedserve:lease_hit_tokens_total"
LEASES_EVICTED = "pagedserve:leases_evicted_total"
LEASE_EXPIRIES = "pagedserve:lease_expiries_total"
COUNTERS = (Q, H, PREEMPTIONS, LEASE_HITS, LEASES_EVICTED, LEASE_EXPIRIES)
GAUGES = ("pagedserve:session_leases", "pagedserve:kv_blocks_leased", "vllm:kv_cache_usage_perc",
          "vllm:num_requests_waiting")


# ----------------------------------------------------------------------------------------------------------
# The workload
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    sessions: int = 48
    turns: int = 10
    system_tokens: int = 600
    task_tokens: int = 100
    tool_result_tokens: tuple[int, int] = (100, 400)  # uniform, inclusive
    output_tokens: tuple[int, int] = (40, 80)  # each turn's max_tokens (ignore_eos: its exact length)
    pause_median_s: float = 1.0  # the tool pause: lognormal with this median ...
    pause_p90_s: float = 6.0  # ... and this 90th percentile,
    pause_max_s: float = 60.0  # cut off here
    stagger_s: float = 5.0  # sessions start uniformly over this many seconds
    seed: int = 0

    @classmethod
    def quick(cls) -> Workload:
        return cls(sessions=6, turns=3, tool_result_tokens=(40, 80), output_tokens=(8, 16), pause_median_s=0.2,
                   pause_p90_s=0.6, pause_max_s=2.0, stagger_s=1.0)


@dataclass(frozen=True)
class Session:
    id: str
    start_s: float  # when it sends its first turn, from the start of the run
    task: str
    max_tokens: list[int]  # per turn
    tool_results: list[str]  # after turns 1 .. T-1
    pauses_s: list[float]  # after turns 1 .. T-1


def tool_pause(workload: Workload, session: int, turn: int) -> float:
    """The pause after `turn` of `session`, seeded by both (adding sessions or turns leaves the others alone)."""
    w = workload
    sigma = math.log(w.pause_p90_s / w.pause_median_s) / statistics.NormalDist().inv_cdf(0.9)
    rng = random.Random(f"pause-{w.seed}-{session}-{turn}")
    return min(w.pause_max_s, rng.lognormvariate(math.log(w.pause_median_s), sigma))


def build_workload(tokenizer, workload: Workload) -> tuple[str, list[Session]]:
    """The shared system prompt and every session's plan; the same for the same seed and tokenizer."""
    w = workload
    rng = random.Random(w.seed)
    random_text = serve.RandomText(tokenizer)
    head_tokens = len(tokenizer.encode(multi_turn.SYSTEM_HEAD, add_special_tokens=False))
    if head_tokens >= w.system_tokens:
        raise ValueError(f"system_tokens must exceed the {head_tokens} tokens of the instructions and tools")
    system = multi_turn.SYSTEM_HEAD + random_text(w.system_tokens - head_tokens, rng)
    sessions = []
    for i in range(w.sessions):
        sessions.append(Session(
            id=f"agent-{w.seed}-{i:03d}",
            start_s=rng.uniform(0.0, w.stagger_s),
            task="Task: " + random_text(w.task_tokens, rng),
            max_tokens=[rng.randint(*w.output_tokens) for _ in range(w.turns)],
            tool_results=[random_text(rng.randint(*w.tool_result_tokens), rng) for _ in range(w.turns - 1)],
            pauses_s=[tool_pause(w, i, t) for t in range(w.turns - 1)],
        ))
    return system, sessions


def tool_message(result: str) -> dict:
    """A tool result as the hermes format puts it: a user turn with a <tool_response> block."""
    return {"role": "user", "content": f"<tool_response>\n{result}\n</tool_response>"}


def final_history_tokens(tokenizer, system: str, session: Session) -> int:
    """Tokens of the session's last prompt plus its last reply: the template rendered with empty replies,
    plus every reply's max_tokens (ignore_eos: replies are exactly that long, give or take re-tokenization)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": session.task}]
    for t in range(len(session.max_tokens)):
        messages.append({"role": "assistant", "content": ""})
        if t < len(session.tool_results):
            messages.append(tool_message(session.tool_results[t]))
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False)) + sum(session.max_tokens)


def round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple)) * multiple


@dataclass(frozen=True)
class Sizes:
    final_tokens_total: int  # all sessions' final histories, summed
    final_tokens_max: int
    max_model_len: int
    pressure_pool: int  # tokens
    roomy_pool: int  # tokens
    kv_bytes_per_token: int
    system_prefix_tokens: int  # the rendered system message, the prefix every session shares

    @classmethod
    def of(cls, tokenizer, system: str, sessions: list[Session]) -> Sizes:
        from common import ModelCost

        from pagedserve.gguf_file import load_gguf_config
        from pagedserve.model_files import default_model_path

        finals = [final_history_tokens(tokenizer, system, s) for s in sessions]
        max_model_len = round_up(max(finals) + 64, 1024)
        pressure = max(round_up(PRESSURE_FRACTION * sum(finals), POOL_QUANTUM), max_model_len)
        roomy = round_up(ROOMY_FRACTION * sum(finals), POOL_QUANTUM)
        cost = ModelCost.from_config(load_gguf_config(default_model_path()))
        prefix = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=False)
        return cls(sum(finals), max(finals), max_model_len, pressure, roomy, int(cost.kv_bytes(1, 2)),
                   len(tokenizer.encode(prefix, add_special_tokens=False)))

    def gib(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / 2**30


# ----------------------------------------------------------------------------------------------------------
# The variants and their servers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    label: str
    engine: str  # "pagedserve" or "vllm"
    leases: bool = True  # pagedserve: False sends kv_retention_s 0 with every request
    policy: str = "fcfs"  # pagedserve's --scheduling-policy
    pressure: bool = True  # the half-size pool (else one that holds everything)


VARIANTS = [
    Variant("leases off, fcfs", "pagedserve", leases=False),
    Variant("leases on, fcfs", "pagedserve"),
    Variant("leases on, session", "pagedserve", policy="session"),
    Variant("leases off, session", "pagedserve", leases=False, policy="session"),
    Variant("vLLM", "vllm"),
    Variant("no pressure: leases off", "pagedserve", leases=False, pressure=False),
    Variant("no pressure: leases on", "pagedserve", pressure=False),
]


def pagedserve_flags(variant: Variant, sizes: Sizes) -> list[str]:
    pool = sizes.pressure_pool if variant.pressure else sizes.roomy_pool
    flags = ["--max-model-len", str(sizes.max_model_len), "--num-kv-blocks", str(pool // PAGEDSERVE_BLOCK),
             "--enable-prefix-caching"]
    if variant.policy != "fcfs":  # fcfs is the default: not passed, so a server without the flag still runs it
        flags += ["--scheduling-policy", variant.policy]
    return flags


def vllm_env(sizes: Sizes) -> dict[str, str]:
    """VLLM_CPU_KVCACHE_SPACE (whole GiB) with room for the pool; --num-gpu-blocks-override sets its size."""
    return {**peers.VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": str(math.ceil(sizes.gib(sizes.pressure_pool)) + 1)}


def vllm_args(sizes: Sizes) -> list[str]:
    return ["--dtype", "bfloat16", "--max-model-len", str(sizes.max_model_len), "--enable-prefix-caching",
            "--num-gpu-blocks-override", str(sizes.pressure_pool // VLLM_BLOCK), "--max-num-seqs", MAX_NUM_SEQS]


def server_for(variant: Variant, sizes: Sizes, port: int) -> ServerProcess:
    name = f"agent-{variant.label.replace(':', '').replace(',', '').replace(' ', '-')}"
    if variant.engine == "vllm":
        python = os.path.join(peers.PEERS, "vllm", "bin", "python")
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", peers.HF_DIR,
                   "--host", "127.0.0.1", "--port", str(port), *vllm_args(sizes)]
        return ServerProcess(name, command, port, env=vllm_env(sizes))
    return ServerProcess(name, pagedserve_command(port, *pagedserve_flags(variant, sizes)), port)


def vllm_pool_tokens(log_path: str) -> int | None:
    """The KV pool vLLM reports in its log ("... KV cache size: 93,184 tokens"), if it does."""
    try:
        with open(log_path, errors="replace") as f:
            found = re.findall(r"KV cache size: ([\d,]+) tokens", f.read())
    except OSError:
        return None
    return int(found[-1].replace(",", "")) if found else None


# ----------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------


async def _drive(base_url: str, variant: Variant, system: str, sessions: list[Session], turns: int,
                 system_prefix_tokens: int, show_progress: bool) -> dict:
    url = f"{base_url}/v1/chat/completions"
    timeout = httpx.Timeout(3600.0, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    pagedserve = variant.engine == "pagedserve"
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = await serve.served_model(client, base_url)

        def payload(session: Session, messages: list[dict], max_tokens: int) -> dict:
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            if pagedserve:
                body["session_id"] = session.id
                if not variant.leases:
                    body["kv_retention_s"] = 0
            return body

        warmup_session = Session("warm-up", 0.0, "", [], [], [])
        warmup = await serve.stream_request(client, url, payload(warmup_session, [{"role": "user", "content": "Hi"}],
                                                                 4), chat=True)
        if not warmup.success:
            raise RuntimeError(f"warm-up request to {url} failed: {warmup.error}")
        if pagedserve:
            await client.post(f"{base_url}/v1/sessions/{warmup_session.id}/close")
        bar = tqdm(total=len(sessions) * turns, desc=variant.label, disable=not show_progress, file=sys.stderr)
        closes: dict[int, int] = {}  # HTTP status of the close requests -> count
        peaks: dict[str, float] = {}

        async def sample_gauges() -> None:
            while True:
                try:
                    values = await serve.fetch_metrics(client, base_url)
                except httpx.HTTPError:
                    values = {}
                for name in GAUGES:
                    if name in values:
                        peaks[name] = max(peaks.get(name, 0.0), values[name])
                await asyncio.sleep(SAMPLE_METRICS_S)

        async def run_session(session: Session) -> dict:
            await asyncio.sleep(session.start_s)
            messages = [{"role": "system", "content": system}, {"role": "user", "content": session.task}]
            ttfts, prompts, outputs, error = [], [], [], None
            for t, max_tokens in enumerate(session.max_tokens):
                result = await serve.stream_request(client, url, payload(session, list(messages), max_tokens),
                                                    chat=True)
                if not result.success:
                    error = f"turn {t + 1}: {result.error}"
                    break
                ttfts.append(result.ttft)
                prompts.append(result.prompt_tokens or 0)
                outputs.append(result.output_tokens)
                bar.update(1)
                messages.append({"role": "assistant", "content": result.text})
                if t < len(session.tool_results):
                    await asyncio.sleep(session.pauses_s[t])  # the tool runs
                    messages.append(tool_message(session.tool_results[t]))
            done_s = time.perf_counter() - start
            if pagedserve:
                try:
                    status = (await client.post(f"{base_url}/v1/sessions/{session.id}/close")).status_code
                except httpx.HTTPError:
                    status = 0
                closes[status] = closes.get(status, 0) + 1
            # Tokens no cache could have held: the first prompt, then what each turn appends to the last one.
            new_tokens = sum(prompts[:1]) + sum(max(0, p - q - o) for p, q, o in zip(prompts[1:], prompts, outputs))
            return {"ttft_s": ttfts, "prompt_tokens": sum(prompts), "output_tokens": sum(outputs),
                    "new_tokens": new_tokens, "error": error, "done_s": done_s}

        before = await serve.fetch_metrics(client, base_url)
        sampler = asyncio.create_task(sample_gauges())
        start = time.perf_counter()
        per_session = await asyncio.gather(*(run_session(s) for s in sessions))
        seconds = max(r["done_s"] for r in per_session)
        sampler.cancel()
        after = await serve.fetch_metrics(client, base_url)
        bar.close()

    errors = [r["error"] for r in per_session if r["error"]]
    return {
        "total_s": seconds,
        "sessions": len(sessions),
        "completed": len(sessions) - len(errors),
        "errors": errors[:3],
        "ttft_by_turn_s": [[r["ttft_s"][t] for r in per_session if len(r["ttft_s"]) > t] for t in range(turns)],
        "prompt_tokens": sum(r["prompt_tokens"] for r in per_session),
        "output_tokens": sum(r["output_tokens"] for r in per_session),
        # the shared system prompt is new only once
        "new_tokens": sum(r["new_tokens"] for r in per_session) - (len(sessions) - 1) * system_prefix_tokens,
        "counters": {name: after[name] - before.get(name, 0.0) for name in COUNTERS if name in after},
        "peaks": peaks,
        "closes": closes,
    }


def run_variant(variant: Variant, sizes: Sizes, system: str, sessions: list[Session], workload: Workload,
                max_load_wait_s: float, run_timeout_s: float, show_progress: bool) -> dict:
    """One server, one pass of the workload: the measurements, or {"error": ...} (the report shows it)."""
    wait_for_quiet(max_load_wait_s)
    meter = OtherLoadMeter().start()
    port = free_port()
    server = server_for(variant, sizes, port)
    result: dict = {}
    try:
        with server:
            log(f"agent sessions: {variant.engine}, {variant.label}")
            coro = _drive(server.base_url, variant, system, sessions, workload.turns, sizes.system_prefix_tokens,
                          show_progress)
            result.update(asyncio.run(asyncio.wait_for(coro, run_timeout_s)))
    except TimeoutError:
        result["error"] = f"did not finish within {run_timeout_s:.0f} s"
    except Exception as e:  # a server that does not start (an unknown flag, vLLM missing) or fails mid-run
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        log(f"  {variant.label}: {result['error']}\n{server.log_tail(15) if os.path.exists(server.log_path) else ''}")
    result["machine"] = meter.stop().label()
    if variant.engine == "vllm":
        result["vllm_pool_tokens"] = vllm_pool_tokens(server.log_path)
    if "error" not in result:
        log(f"  {result['completed']}/{result['sessions']} sessions in {result['total_s']:.1f} s "
            f"({60 * result['completed'] / result['total_s']:.2f} sessions/min)")
    return result


def combine(rounds: list[dict]) -> dict:
    """The rounds of one variant as one result: times and counts summed, TTFTs pooled, peaks maxed."""
    good = [r for r in rounds if "error" not in r]
    out: dict = {"machine": " / ".join(r["machine"] for r in rounds), "rounds": len(good),
                 "failed_rounds": [r["error"] for r in rounds if "error" in r]}
    out["vllm_pool_tokens"] = next((r["vllm_pool_tokens"] for r in rounds if r.get("vllm_pool_tokens")), None)
    if not good:
        return out
    for key in ("total_s", "sessions", "completed", "prompt_tokens", "output_tokens", "new_tokens"):
        out[key] = sum(r[key] for r in good)
    out["errors"] = [e for r in good for e in r["errors"]][:3]
    out["ttft_by_turn_s"] = [[v for r in good for v in r["ttft_by_turn_s"][t]] for t in range(len(good[0]
                                                                                                  ["ttft_by_turn_s"]))]
    out["counters"] = {k: sum(r["counters"][k] for r in good if k in r["counters"])
                       for k in COUNTERS if any(k in r["counters"] for r in good)}
    out["peaks"] = {k: max(r["peaks"][k] for r in good if k in r["peaks"])
                    for k in GAUGES if any(k in r["peaks"] for r in good)}
    out["closes"] = {}
    for r in good:
        for status, n in r["closes"].items():
            out["closes"][status] = out["closes"].get(status, 0) + n
    return out


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def sessions_per_min(r: dict) -> float | None:
    return 60 * r["completed"] / r["total_s"] if r.get("total_s") else None


def turn_ttft(r: dict, turn: int | None) -> serve.Stats | None:
    """Mean / median / p99 (ms) of turn `turn`'s TTFT (1-based), or of every turn's when None."""
    if "ttft_by_turn_s" not in r:
        return None
    values = [v for vs in r["ttft_by_turn_s"] for v in vs] if turn is None else r["ttft_by_turn_s"][turn - 1]
    return serve.Stats.of(values)


def computed(r: dict) -> float | None:
    """Prompt tokens the server computed: prefix-cache queries - hits."""
    counters = r.get("counters", {})
    return counters[Q] - counters[H] if Q in counters and H in counters else None


def recomputed(r: dict) -> float | None:
    """Of them, history computed again: computed - the tokens no cache could have held (about: the cache hits
    whole blocks only, so up to a block per turn is recomputed at best)."""
    value = computed(r)
    return None if value is None else value - r["new_tokens"]


def hit_rate(r: dict) -> float | None:
    counters = r.get("counters", {})
    return counters[H] / counters[Q] if counters.get(Q) and H in counters else None


def shown_turns(turns: int) -> list[int]:
    return list(range(1, turns + 1)) if turns <= 5 else sorted({1, 2, turns // 2, turns})


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ms(stats: serve.Stats | None) -> str:
    return "-" if stats is None else f"{stats.mean:,.0f} / {stats.p99:,.0f}"


def variant_table(results: dict[str, dict], variants: dict[str, Variant], turns: int) -> str:
    labels = list(results)

    def row(name: str, fn) -> list[str]:
        return [name, *(("-" if "total_s" not in results[v] else fn(results[v], variants[v])) for v in labels)]

    def counter(name: str):
        return lambda r, v: "-" if v.engine != "pagedserve" or name not in r["counters"] else _count(
            r["counters"][name])

    def peak(name: str, scale: float = 1.0, suffix: str = ""):
        return lambda r, v: "-" if name not in r["peaks"] else f"{scale * r['peaks'][name]:,.0f}{suffix}"

    rows = [
        ["rest of the machine during each round", *(results[v]["machine"] for v in labels)],
        row("sessions completed", lambda r, v: f"{r['completed']} / {r['sessions']}"),
        row("sessions / min", lambda r, v: f"{sessions_per_min(r):.2f}"),
        row("total time (s)", lambda r, v: f"{r['total_s'] / max(1, r['rounds']):.1f}"),
        row("turn TTFT, all turns, mean / p99 (ms)", lambda r, v: _ms(turn_ttft(r, None))),
        *(row(f"turn {t} TTFT, mean / p99 (ms)", lambda r, v, t=t: _ms(turn_ttft(r, t))) for t in shown_turns(turns)),
        row("prompt tokens (usage)", lambda r, v: _count(r["prompt_tokens"])),
        row("prompt tokens computed (queries - hits)", lambda r, v: _count(computed(r))),
        row("of them, history recomputed", lambda r, v: _count(recomputed(r))),
        row("prefix-cache hit rate", lambda r, v: "-" if hit_rate(r) is None else f"{100 * hit_rate(r):.1f}%"),
        row("preemptions", lambda r, v: _count(r["counters"].get(PREEMPTIONS))),
        row("peak KV usage", peak("vllm:kv_cache_usage_perc", 100.0, "%")),
        row("peak requests waiting", peak("vllm:num_requests_waiting")),
        row("lease hit tokens", counter(LEASE_HITS)),
        row("leases evicted", counter(LEASES_EVICTED)),
        row("lease expiries", counter(LEASE_EXPIRIES)),
        row("peak session leases", peak("pagedserve:session_leases")),
        row("peak KV blocks leased", peak("pagedserve:kv_blocks_leased")),
        row("session closes (HTTP status: count)", lambda r, v: ", ".join(
            f"{s}: {n}" for s, n in sorted(r["closes"].items())) or "-"),
    ]
    table = markdown_table(["", *labels], rows)
    notes = [f"- **{v}**: {'; '.join(results[v]['failed_rounds'])}" for v in labels if results[v]["failed_rounds"]]
    notes += [f"- {v}: sessions that failed: {'; '.join(results[v]['errors'])}" for v in labels
              if results[v].get("errors")]
    return table + ("\n\nFailures:\n\n" + "\n".join(notes) if notes else "")


def goal_rows(results: dict[str, dict], variants: dict[str, Variant]) -> list[list[str]]:
    """Issue #11's goals, each with what was measured and whether it is met."""
    rows = []

    def done(label: str) -> dict | None:
        r = results.get(label)
        return r if r and r.get("completed") else None

    pressured = {label: r for label, v in variants.items() if v.engine == "pagedserve" and v.pressure
                 and (r := done(label))}
    vllm = done("vLLM")
    if pressured and vllm:
        best = max(pressured, key=lambda label: sessions_per_min(pressured[label]))
        ours, theirs = pressured[best], vllm
        ratio = sessions_per_min(ours) / sessions_per_min(theirs)
        rows.append([f"under pressure, sessions/min >= 1.5x vLLM's (best pagedserve variant: {best})",
                     f"{ratio:.2f}x ({sessions_per_min(ours):.2f} vs {sessions_per_min(theirs):.2f})",
                     "met" if ratio >= 1.5 else "**not met**"])
        a, b = turn_ttft(ours, None).p99, turn_ttft(theirs, None).p99
        rows.append([f"under pressure, p99 turn TTFT below vLLM's ({best})", f"{a:,.0f} ms vs {b:,.0f} ms",
                     "met" if a < b else "**not met**"])
    else:
        rows.append(["under pressure, sessions/min >= 1.5x vLLM's and p99 turn TTFT below vLLM's",
                     "not measured (a run is missing)", "-"])
    off, on = done("no pressure: leases off"), done("no pressure: leases on")
    if off and on:
        ratio = sessions_per_min(on) / sessions_per_min(off)
        rows.append(["no pressure, leases on within 3% of leases off (sessions/min)",
                     f"{ratio:.3f}x ({sessions_per_min(on):.2f} vs {sessions_per_min(off):.2f})",
                     "met" if ratio >= 0.97 else "**not met**"])
    else:
        rows.append(["no pressure, leases on within 3% of leases off", "not measured (a run is missing)", "-"])
    return rows


def workload_text(w: Workload, sessions: list[Session]) -> str:
    pauses = sorted(p for s in sessions for p in s.pauses_s)
    floor = max(s.start_s + sum(s.pauses_s) for s in sessions)
    return (f"{w.sessions} concurrent sessions x {w.turns} turns, started uniformly over the first {w.stagger_s:g} s; "
            f"shared system prompt of {w.system_tokens} tokens (instructions, {len(multi_turn.TOOLS)} tool "
            f"definitions, filler) and a {w.task_tokens}-token task per session; each turn generates "
            f"{w.output_tokens[0]}-{w.output_tokens[1]} tokens (`ignore_eos`, greedy, streamed), then the session "
            f"pauses for its tool (lognormal, median {w.pause_median_s:g} s, p90 {w.pause_p90_s:g} s, at most "
            f"{w.pause_max_s:g} s; drawn: median {statistics.median(pauses):.2f} s, mean "
            f"{statistics.mean(pauses):.2f} s, max {pauses[-1]:.1f} s) and appends the reply and a tool result of "
            f"{w.tool_result_tokens[0]}-{w.tool_result_tokens[1]} tokens (a user turn with a `<tool_response>` "
            f"block); seed {w.seed}. The pauses alone make the run last at least {floor:.1f} s")


def section(results: dict[str, dict], variants: dict[str, Variant], workload: Workload, sessions: list[Session],
            sizes: Sizes, notes: list[str], args: argparse.Namespace, minutes: float,
            machine: list[tuple[str, str]]) -> str:
    flags = " ".join(["--engines", *args.engines] if args.engines != ["pagedserve", "vllm"] else [])
    command = " ".join(filter(None, ["python benchmarks/agent_sessions.py", "--quick" if args.quick else "",
                                     f"--rounds {args.rounds}" if args.rounds != 1 else "", flags]))
    lines = [
        "## Agent sessions with tool pauses under KV-memory pressure: session leases, scheduling, vLLM",
        "",
        f"Generated by `{command}` in {minutes:.1f} min: one server at a time on this machine, driven over "
        "loopback HTTP by concurrent agent sessions (`/v1/chat/completions`, streamed)"
        + (f", {args.rounds} rounds with the variants interleaved (times and counts summed, TTFTs pooled)"
           if args.rounds > 1 else "") + ".",
        "",
    ]
    if args.quick:
        lines += [QUICK_WARNING, ""]
    vllm_pool = next((r["vllm_pool_tokens"] for r in results.values() if r.get("vllm_pool_tokens")), None)
    rows = [
        *machine,
        ("Workload", workload_text(workload, sessions)),
        ("Final histories", f"{sizes.final_tokens_total:,} tokens in all, {sizes.final_tokens_max:,} at most; "
                            f"`--max-model-len {sizes.max_model_len}` in both engines"),
        ("KV pool under pressure", f"{sizes.pressure_pool:,} tokens ({PRESSURE_FRACTION:.0%} of the final histories,"
                                   f" {sizes.gib(sizes.pressure_pool):.2f} GiB in bf16): pagedserve "
                                   f"`--num-kv-blocks {sizes.pressure_pool // PAGEDSERVE_BLOCK}` (16-token blocks),"
                                   f" vLLM `--num-gpu-blocks-override {sizes.pressure_pool // VLLM_BLOCK}` "
                                   f"(128-token blocks)" + (f"; vLLM's log reports {vllm_pool:,} tokens"
                                                             if vllm_pool else "")),
        ("KV pool, no pressure", f"{sizes.roomy_pool:,} tokens ({ROOMY_FRACTION:.0%} of the final histories, "
                                 f"{sizes.gib(sizes.roomy_pool):.2f} GiB)"),
        ("pagedserve", f"`pagedserve serve {' '.join(PAGEDSERVE_FLAGS)} --max-model-len L --num-kv-blocks N "
                       "--enable-prefix-caching [--scheduling-policy session]` (default model GGUF, dequantized); "
                       "requests carry `session_id`, and `kv_retention_s: 0` when leases are off; sessions are "
                       "closed after their last turn"),
        ("vLLM", f"vllm-cpu {peers.VLLM_VERSION}: `python -m vllm.entrypoints.openai.api_server --model HF_DIR "
                 f"{' '.join(vllm_args(sizes))}`, "
                 + " ".join(f"{k}={v}" for k, v in vllm_env(sizes).items())
                 + "; otherwise its defaults (fcfs); same bf16 weights, no session fields sent"),
        ("Before each run", f"waited (bounded) until other processes used under {QUIET_OTHER_CORES} cores; the "
                            "CPU they used during the run is recorded, and a run where it was more is marked "
                            "**under load**"),
    ]
    lines += [markdown_table(["", ""], rows), ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    pressure = {k: r for k, r in results.items() if variants[k].pressure}
    roomy = {k: r for k, r in results.items() if not variants[k].pressure}
    if pressure:
        lines += ["### Under memory pressure", "", variant_table(pressure, variants, workload.turns), ""]
    if roomy:
        lines += ["### No memory pressure", "", variant_table(roomy, variants, workload.turns), ""]
    lines += [
        "Prompt tokens computed = prefix-cache queries - hits (from `/metrics`, before and after the run; a "
        "preempted request counts again when it is re-admitted); history recomputed = that minus the tokens no "
        "cache could have held (each session's first prompt and what every later turn appends, from `usage`; "
        "the shared system prompt once). Caches hit whole blocks only (16 tokens in pagedserve, 128 in vLLM), so "
        "even a perfect cache recomputes part of a block per turn. Peaks are of gauges read every "
        f"{SAMPLE_METRICS_S:g} s. Lease counters and gauges are pagedserve's `pagedserve:*` metrics (\"-\": not "
        "reported).",
        "",
        "### Goals",
        "",
        markdown_table(["goal", "measured", ""], goal_rows(results, variants)),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def setup_vllm() -> str | None:
    """Install vLLM's CPU build and export the weights (once); None, or why vLLM cannot run."""
    try:
        os.makedirs(peers.PEERS, exist_ok=True)
        peers.setup_vllm()
        peers.export_hf_dir()
    except Exception as e:
        return f"vLLM could not be set up ({type(e).__name__}: {e}); its variant is skipped"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(REPO, "BENCHMARKS.md"),
                        help="Markdown file whose `agent-sessions` section is rewritten")
    parser.add_argument("--engines", nargs="+", choices=["pagedserve", "vllm"], default=["pagedserve", "vllm"])
    parser.add_argument("--rounds", type=int, default=1, help="passes over the variants (interleaved)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and short pauses, to check the script")
    args = parser.parse_args()
    workload = Workload.quick() if args.quick else Workload()
    max_load_wait_s = 10.0 if args.quick else 300.0
    run_timeout_s = 600.0 if args.quick else 3 * 3600.0

    start = time.monotonic()
    machine = machine_description()
    notes = []
    variants = {v.label: v for v in VARIANTS if v.engine in args.engines}
    if "vllm" in args.engines and (problem := setup_vllm()):
        notes.append(problem)
        log(problem)
        variants.pop("vLLM")
    tokenizer = serve.load_tokenizer(None)
    system, sessions = build_workload(tokenizer, workload)
    sizes = Sizes.of(tokenizer, system, sessions)
    log(f"final histories {sizes.final_tokens_total:,} tokens; pools: {sizes.pressure_pool:,} tokens under pressure, "
        f"{sizes.roomy_pool:,} without; max_model_len {sizes.max_model_len}")

    rounds: dict[str, list[dict]] = {label: [] for label in variants}
    for i in range(args.rounds):
        if args.rounds > 1:
            log(f"round {i + 1} of {args.rounds}")
        for label, variant in variants.items():
            rounds[label].append(run_variant(variant, sizes, system, sessions, workload, max_load_wait_s,
                                             run_timeout_s, show_progress=not args.quick))
    results = {label: combine(rs) for label, rs in rounds.items()}
    if "vLLM" in results and (pool := results["vLLM"].get("vllm_pool_tokens")) and pool != sizes.pressure_pool:
        notes.append(f"vLLM's log reports a KV pool of {pool:,} tokens, not the {sizes.pressure_pool:,} asked for")
    body = section(results, variants, workload, sessions, sizes, notes, args, (time.monotonic() - start) / 60,
                   machine)
    replace_section(args.output, "agent-sessions", body)
    print(body)


if __name__ == "__main__":
    main()
