"""`pagedserve bench serve`: load any OpenAI-compatible server and report throughput and latency.

The workload and the metrics follow vLLM's serving benchmark (`vllm bench serve`):

- random prompts, built as text that tokenizes to `--input-len` tokens with the model's tokenizer, and
  `--output-len` generated tokens per request (`ignore_eos`, so every request runs to its length);
- a sweep of fixed concurrency levels (a new request starts as soon as one finishes), or of request rates
  (Poisson arrivals, optionally capped by `--max-concurrency`);
- TTFT: request sent -> first streamed token; TPOT: per request, (latency - TTFT) / (output tokens - 1);
  ITL: the gaps between consecutive streamed chunks, all requests pooled; E2EL: request sent -> last chunk.
  Mean, median and p99 (numpy's linear percentile), in milliseconds. Throughputs are over the level's wall
  time, from the first request sent to the last one done.

Token counts come from the server's `usage` (`stream_options.include_usage`); a server that sends none is
counted one token per streamed chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

DEFAULT_CONCURRENCY = (1, 4, 16, 64, 256)
RATE_LEVEL_SECONDS = 30  # a request-rate level sends about this many seconds of arrivals


@dataclass
class RequestResult:
    """What one streamed request saw. Times are seconds from the moment it was sent."""

    success: bool = False
    error: str = ""
    prompt_tokens: int | None = None  # from usage; None when the server sends no usage
    output_tokens: int = 0
    text: str = ""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0


@dataclass(frozen=True)
class Stats:
    mean: float
    p50: float
    p99: float

    @classmethod
    def of(cls, values_s: Sequence[float]) -> Stats | None:
        """Mean, median and p99 of durations in seconds, reported in milliseconds (None if empty)."""
        if not values_s:
            return None
        ms = np.asarray(values_s, dtype=np.float64) * 1000
        return cls(float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


@dataclass(frozen=True)
class LevelMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (prompt + output tokens) / s
    ttft_ms: Stats | None
    tpot_ms: Stats | None
    itl_ms: Stats | None
    e2el_ms: Stats | None


def compute_metrics(results: Sequence[RequestResult], duration_s: float) -> LevelMetrics:
    """vLLM's definitions over the successful requests of one level that ran for `duration_s`."""
    done = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return LevelMetrics(
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(done) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        ttft_ms=Stats.of([r.ttft for r in done]),
        tpot_ms=Stats.of(tpots),
        itl_ms=Stats.of([gap for r in done for gap in r.itl]),
        e2el_ms=Stats.of([r.latency for r in done]),
    )


# ----------------------------------------------------------------------------------------------------------
# One request
# ----------------------------------------------------------------------------------------------------------


async def stream_request(client: httpx.AsyncClient, url: str, payload: dict, chat: bool = False) -> RequestResult:
    """POST a streaming completion (or chat completion) and time every chunk that carries text."""
    result = RequestResult()
    pieces: list[str] = []
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error in stream: {chunk['error']}"
                    return result
                if usage := chunk.get("usage"):
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.output_tokens = usage.get("completion_tokens") or 0
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not text:
                        continue
                    if pieces:
                        result.itl.append(now - last)
                    else:
                        result.ttft = now - start
                    last = now
                    pieces.append(text)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    if not pieces:
        result.error = "the stream carried no text"
        return result
    result.text = "".join(pieces)
    result.output_tokens = result.output_tokens or len(pieces)
    result.latency = last - start
    result.success = True
    return result


def completion_payload(model: str, prompt: str, output_len: int, ignore_eos: bool, extra_body: dict) -> dict:
    payload = {
        "model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        payload["ignore_eos"] = True
    return {**payload, **extra_body}


# ----------------------------------------------------------------------------------------------------------
# Server helpers
# ----------------------------------------------------------------------------------------------------------


async def served_model(client: httpx.AsyncClient, base_url: str) -> str:
    response = await client.get(f"{base_url}/v1/models")
    response.raise_for_status()
    models = response.json()["data"]
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model")
    return models[0]["id"]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over its label sets}."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def fetch_metrics(client: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    response = await client.get(f"{base_url}/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | None):
    """A tokenizer from an HF directory or a .gguf file; None means the default model's (SmolLM2 GGUF)."""
    from pagedserve.model_files import default_model_path, is_gguf_file
    from pagedserve.tokenizer import load_gguf_tokenizer

    path = path or default_model_path()
    if is_gguf_file(path):
        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class RandomText:
    """Random text of an exact token length, drawn from the tokens that survive a decode/encode round trip
    on their own (byte-level vocabularies hold partial UTF-8 sequences that would not)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(len(tokenizer)) if i not in special]
        texts = tokenizer.batch_decode([[i] for i in ids])
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.vocab = [i for i, e in zip(ids, encoded) if e == [i]]

    def __call__(self, num_tokens: int, rng: random.Random) -> str:
        """Neighbouring tokens can still merge when re-encoded, so the ids are re-drawn at the seams a few
        times; the rare text that never settles is returned at the closest length (the server's usage tells)."""
        ids = rng.choices(self.vocab, k=num_tokens)
        for _ in range(10):
            text = self.tokenizer.decode(ids)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == num_tokens:
                return text
            ids = ids[:num_tokens] + rng.choices(self.vocab, k=max(0, num_tokens - len(ids)))
        return self.tokenizer.decode(ids)


# ----------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    concurrency: int | None  # None: no cap
    request_rate: float | None  # Poisson arrivals, requests / s; None: all at once
    num_prompts: int


def sweep_levels(ns: argparse.Namespace) -> list[Level]:
    """The concurrency sweep, or the request-rate sweep when `--request-rate` is given."""

    def clamp(count: float) -> int:
        return ns.num_prompts or min(ns.max_prompts, max(ns.min_prompts, math.ceil(count)))

    if ns.request_rate:
        return [Level(ns.max_concurrency, rate, clamp(RATE_LEVEL_SECONDS * rate)) for rate in ns.request_rate]
    return [Level(c, None, clamp(ns.prompts_per_concurrency * c)) for c in ns.concurrency]


async def run_level(
    client: httpx.AsyncClient, url: str, payloads: Sequence[dict], level: Level, seed: int, show_progress: bool,
) -> tuple[list[RequestResult], float]:
    """Send `payloads` under the level's concurrency cap and arrival rate; return results and wall time."""
    semaphore = asyncio.Semaphore(level.concurrency) if level.concurrency else None
    label = f"{level.request_rate} req/s" if level.request_rate else f"concurrency {level.concurrency}"
    bar = tqdm(total=len(payloads), desc=label, disable=not show_progress, file=sys.stderr)
    rng = random.Random(seed)

    async def one(payload: dict) -> RequestResult:
        if semaphore is None:
            result = await stream_request(client, url, payload)
        else:
            async with semaphore:
                result = await stream_request(client, url, payload)
        bar.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for i, payload in enumerate(payloads):
        if i and level.request_rate:
            await asyncio.sleep(rng.expovariate(level.request_rate))
        tasks.append(asyncio.create_task(one(payload)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return results, duration


async def run(ns: argparse.Namespace) -> dict:
    """Run the whole sweep against `ns.base_url`; the results as a JSON-ready dict."""
    base_url = ns.base_url.rstrip("/")
    levels = sweep_levels(ns)
    timeout = httpx.Timeout(ns.request_timeout, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        try:
            model = ns.model or await served_model(client, base_url)
        except httpx.HTTPError as e:
            raise ValueError(f"no OpenAI-compatible server at {base_url}: {type(e).__name__}: {e}") from None
        tokenizer_path = ns.tokenizer or (model if os.path.exists(model) else None)
        random_text = RandomText(load_tokenizer(tokenizer_path))
        extra_body = json.loads(ns.extra_body) if ns.extra_body else {}
        rng = random.Random(ns.seed)
        url = f"{base_url}/v1/completions"

        def payload(prompt: str, output_len: int) -> dict:
            return completion_payload(model, prompt, output_len, ns.ignore_eos, extra_body)

        warmup = await stream_request(client, url, payload(random_text(16, rng), 4))
        if not warmup.success:
            raise ValueError(f"warm-up request to {url} failed: {warmup.error}")
        level_results = []
        for i, level in enumerate(levels):
            # Fresh prompts per level, so a prefix cache cannot serve one level from another's prompts.
            payloads = [payload(random_text(ns.input_len, rng), ns.output_len)
                        for _ in range(level.num_prompts)]
            results, duration = await run_level(client, url, payloads, level, ns.seed + i, not ns.disable_tqdm)
            errors = sorted({r.error for r in results if not r.success})
            level_results.append({
                **dataclasses.asdict(level),
                **dataclasses.asdict(compute_metrics(results, duration)),
                "errors": errors[:5],
            })
    return {
        "base_url": base_url,
        "model": model,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "input_len": ns.input_len,
        "output_len": ns.output_len,
        "ignore_eos": ns.ignore_eos,
        "extra_body": extra_body,
        "seed": ns.seed,
        "levels": level_results,
    }


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def _ms(stats: dict | None) -> list[str]:
    return ["-"] * 3 if stats is None else [f"{stats[k]:,.1f}" for k in ("mean", "p50", "p99")]


def results_table(results: dict) -> str:
    """The sweep as a Markdown table: one row per level."""
    header = ["concurrency", "req/s in", "done", "req/s", "out tok/s", "in tok/req", "out tok/req",
              "TTFT mean", "TTFT p50", "TTFT p99", "TPOT mean", "TPOT p50", "TPOT p99",
              "ITL mean", "ITL p50", "ITL p99"]
    rows = []
    for lv in results["levels"]:
        done = lv["completed"]
        rows.append([
            str(lv["concurrency"] or "-"),
            f"{lv['request_rate']:g}" if lv["request_rate"] else "inf",
            f"{done}/{done + lv['failed']}",
            f"{lv['request_throughput']:.2f}",
            f"{lv['output_throughput']:,.1f}",
            f"{lv['total_input_tokens'] / done:.1f}" if done and lv["total_input_tokens"] else "-",
            f"{lv['total_output_tokens'] / done:.1f}" if done else "-",
            *_ms(lv["ttft_ms"]), *_ms(lv["tpot_ms"]), *_ms(lv["itl_ms"]),
        ])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines) + "\n\nTimes in ms. TTFT, TPOT and ITL as in vLLM's serving benchmark."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's address")
    parser.add_argument("--model", default=None, help="model id to request (default: the first of /v1/models)")
    parser.add_argument("--tokenizer", default=None,
                        help="HF directory or .gguf whose tokenizer sizes the prompts (default: the model id if it "
                             "is a local path, else the default SmolLM2 GGUF)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY),
                        help="the fixed-concurrency levels to sweep")
    parser.add_argument("--request-rate", type=float, nargs="+", default=None,
                        help="sweep these Poisson arrival rates (requests/s) instead of the concurrency levels")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="with --request-rate: cap on requests in flight (default: none)")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests per level (overrides the rule below)")
    parser.add_argument("--prompts-per-concurrency", type=float, default=2.0,
                        help="requests per concurrency level = this x concurrency (a rate level: 30 s of "
                             "arrivals), clamped to [--min-prompts, --max-prompts]")
    parser.add_argument("--min-prompts", type=int, default=8, help="fewest requests in a level")
    parser.add_argument("--max-prompts", type=int, default=512, help="most requests in a level")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="send vLLM's ignore_eos so every request makes exactly --output-len tokens")
    parser.add_argument("--extra-body", default=None,
                        help='JSON merged into every request, e.g. \'{"logit_bias": {"2": -100}}\'')
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    parser.add_argument("--request-timeout", type=float, default=3600.0, help="seconds")
    parser.add_argument("--output-json", default=None, help="also write the results to this file")
    parser.add_argument("--disable-tqdm", action="store_true")


def validate(ns: argparse.Namespace) -> None:
    checks = [
        (ns.input_len >= 1 and ns.output_len >= 1, "--input-len and --output-len must be >= 1"),
        (all(c >= 1 for c in ns.concurrency), "--concurrency levels must be >= 1"),
        (not ns.request_rate or all(r > 0 for r in ns.request_rate), "--request-rate must be > 0"),
        (ns.max_concurrency is None or ns.max_concurrency >= 1, "--max-concurrency must be >= 1"),
        (ns.num_prompts is None or ns.num_prompts >= 1, "--num-prompts must be >= 1"),
        (1 <= ns.min_prompts <= ns.max_prompts, "need 1 <= --min-prompts <= --max-prompts"),
        (ns.prompts_per_concurrency > 0, "--prompts-per-concurrency must be > 0"),
        (ns.tokenizer is None or os.path.exists(ns.tokenizer), f"--tokenizer {ns.tokenizer}: no such path"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if ns.extra_body:
        try:
            body = json.loads(ns.extra_body)
        except json.JSONDecodeError as e:
            raise ValueError(f"--extra-body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ValueError("--extra-body must be a JSON object")


def main(ns: argparse.Namespace) -> dict:
    """Validate, run the sweep, print the table, write the JSON if asked; return the results."""
    validate(ns)
    results = asyncio.run(run(ns))
    print(f"\n{results['model']} at {results['base_url']}: {results['input_len']} in, {results['output_len']} out\n")
    print(results_table(results))
    for lv in results["levels"]:
        for error in lv["errors"]:
            print(f"concurrency {lv['concurrency']}: {error}", file=sys.stderr)
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m pagedserve.benchmarks.serve", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    main(_parser.parse_args())
