"""Serving metrics: Prometheus series (vLLM's names, so its dashboards work) and a periodic log line."""

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from pagedserve.engine.protocol import EngineStats
from pagedserve.frontend.output_processor import RequestState

logger = logging.getLogger("pagedserve")
disable_created_metrics()  # no `_created` series, as vLLM

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0]
_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]


class PrometheusMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)")
        self.preemptions = counter("vllm:num_preemptions", "Preemptions (recompute) so far")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.requests_success = Counter(
            "vllm:request_success", "Finished requests by finish reason", ["model_name", "finished_reason"],
            registry=r,
        )
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token", _TTFT_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds", "Mean time per output token after the first",
                              _TPOT_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to last token", _E2E_BUCKETS)
        # agent sessions (no vLLM counterpart)
        self.session_leases = gauge("pagedserve:session_leases", "Sessions whose KV is held across a pause")
        self.blocks_leased = gauge("pagedserve:kv_blocks_leased", "KV blocks held by session leases")
        self.lease_hit_tokens = counter("pagedserve:lease_hit_tokens", "Prompt tokens not recomputed thanks to a lease")
        self.leases_evicted = counter("pagedserve:leases_evicted", "Leases cut short under memory pressure")
        self.lease_expiries = counter("pagedserve:lease_expiries", "Leases whose TTL ran out")
        self.spec_drafts = counter("vllm:spec_decode_num_drafts", "Speculative drafts verified")
        self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Speculative tokens drafted")
        self.spec_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens", "Drafted tokens accepted")
        self.spec_accepted_per_position = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos", "Drafted tokens accepted at each draft position",
            ["model_name", "position"], registry=r,
        )
        self.model_name = model_name
        self._last_stats = EngineStats()

    def record_stats(self, stats: EngineStats) -> None:
        """Engine-core stats after a step: gauges are set, cumulative counts advance by their delta."""
        self.running.set(stats.num_requests_running)
        self.waiting.set(stats.num_requests_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.session_leases.set(stats.num_session_leases)
        self.blocks_leased.set(stats.num_blocks_leased)
        last = self._last_stats
        for counter, now, before in (
            (self.preemptions, stats.num_preemptions, last.num_preemptions),
            (self.prefix_queries, stats.prefix_cache_queries, last.prefix_cache_queries),
            (self.prefix_hits, stats.prefix_cache_hits, last.prefix_cache_hits),
            (self.lease_hit_tokens, stats.lease_hit_tokens, last.lease_hit_tokens),
            (self.leases_evicted, stats.leases_evicted, last.leases_evicted),
            (self.lease_expiries, stats.lease_expiries, last.lease_expiries),
            (self.spec_drafts, stats.spec_num_drafts, last.spec_num_drafts),
            (self.spec_draft_tokens, stats.spec_num_draft_tokens, last.spec_num_draft_tokens),
            (self.spec_accepted_tokens, stats.spec_num_accepted_tokens, last.spec_num_accepted_tokens),
        ):
            counter.inc(max(0, now - before))
        for position, accepted in enumerate(stats.spec_accepted_per_position):
            before = last.spec_accepted_per_position[position] if position < len(last.spec_accepted_per_position) else 0
            self.spec_accepted_per_position.labels(self.model_name, str(position)).inc(max(0, accepted - before))
        self._last_stats = stats

    def engine_restarted(self) -> None:
        """A new engine counts from zero, and until it runs nothing is running."""
        self.record_stats(EngineStats())

    def record_new_tokens(self, num_tokens: int) -> None:
        self.generation_tokens.inc(num_tokens)

    def record_finished(self, state: RequestState) -> None:
        now = time.monotonic()
        self.prompt_tokens.inc(len(state.prompt_token_ids))
        for sample in state.samples:
            self.requests_success.labels(self.model_name, sample.finish_reason).inc()
        self.e2e.observe(now - state.arrival_time)
        if state.first_token_time is not None:
            self.ttft.observe(state.first_token_time - state.arrival_time)
            num_after_first = state.num_generation_tokens - len(state.samples)
            if num_after_first > 0 and state.last_token_time is not None:
                self.tpot.observe((state.last_token_time - state.first_token_time) / num_after_first)


class LoggingStatLogger:
    """One line every `interval` seconds while there is work, like vLLM's."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.last_time = time.monotonic()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.stats = EngineStats()
        self._logged_stats = EngineStats()  # the stats at the last line, for the interval's hit rate

    def record(self, stats: EngineStats, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        self.stats = stats
        self.num_prompt_tokens += num_prompt_tokens
        self.num_generation_tokens += num_generation_tokens
        now = time.monotonic()
        if now - self.last_time >= self.interval:
            self.log(now)

    def log(self, now: float) -> None:
        elapsed = now - self.last_time
        stats, last = self.stats, self._logged_stats
        if self.num_prompt_tokens or self.num_generation_tokens or stats.num_requests_running:
            queries = stats.prefix_cache_queries - last.prefix_cache_queries
            hits = stats.prefix_cache_hits - last.prefix_cache_hits
            extra = (f", Session leases: {stats.num_session_leases} ({stats.num_blocks_leased} blocks)"
                     if stats.num_session_leases else "")
            drafts = stats.spec_num_drafts - last.spec_num_drafts
            if drafts > 0:  # as vLLM's: accepted / drafted tokens, and tokens per verified draft (with the sampled one)
                accepted = stats.spec_num_accepted_tokens - last.spec_num_accepted_tokens
                drafted = stats.spec_num_draft_tokens - last.spec_num_draft_tokens
                extra += (f", Draft acceptance rate: {100 * accepted / drafted:.1f}%, "
                          f"Mean acceptance length: {1 + accepted / drafts:.2f}")
            logger.info(
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
                "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%%s",
                self.num_prompt_tokens / elapsed, self.num_generation_tokens / elapsed,
                stats.num_requests_running, stats.num_requests_waiting, 100 * stats.kv_cache_usage,
                100 * hits / queries if queries > 0 else 0.0, extra,
            )
        self._logged_stats = stats
        self.last_time = now
        self.num_prompt_tokens = self.num_generation_tokens = 0
