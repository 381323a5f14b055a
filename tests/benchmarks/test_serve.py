"""`pagedserve bench serve`: the metric definitions, and the client end to end against a fake streaming server."""

import argparse
import json
import random

import pytest
from conftest import make_tokenizer
from fake_openai_server import EARLY_EOS, FakeOpenAIServer, serving
from transformers import AutoTokenizer

from pagedserve.benchmarks import serve


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer"))
    make_tokenizer(path)
    return path


@pytest.fixture
def fake(tokenizer_dir):
    """A fresh fake server: 50 ms to the first token, then 10 ms per token."""
    fake = FakeOpenAIServer(AutoTokenizer.from_pretrained(tokenizer_dir), ttft_s=0.05, itl_s=0.01)
    with serving(fake) as base_url:
        fake.base_url = base_url
        yield fake


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


# ----------------------------------------------------------------------------------------------------------
# Metrics on a synthetic timeline
# ----------------------------------------------------------------------------------------------------------


def timeline_request(ttft: float, gaps: list[float], prompt_tokens: int = 10) -> serve.RequestResult:
    """A request whose first token came at `ttft` s and each next one `gaps[i]` s after the previous."""
    return serve.RequestResult(success=True, prompt_tokens=prompt_tokens, output_tokens=len(gaps) + 1,
                               ttft=ttft, itl=list(gaps), latency=ttft + sum(gaps))


def test_metrics_on_a_synthetic_timeline():
    # Ten requests: TTFT 0.1, 0.2, ..., 1.0 s; request i makes i + 2 tokens, 0.02 s apart (request 9: 0.05 s).
    results = [timeline_request(0.1 * (i + 1), [0.02] * (i + 1)) for i in range(9)]
    results.append(timeline_request(1.0, [0.05] * 10))
    results.append(serve.RequestResult(error="HTTP 500"))  # failed: counted, but in no statistic
    m = serve.compute_metrics(results, duration_s=4.0)

    assert (m.completed, m.failed) == (10, 1)
    assert m.total_input_tokens == 100
    assert m.total_output_tokens == sum(range(2, 11)) + 11 == 65
    assert m.request_throughput == pytest.approx(10 / 4)
    assert m.output_throughput == pytest.approx(65 / 4)
    assert m.total_token_throughput == pytest.approx(165 / 4)
    # TTFT: mean 550 ms, median 550 ms, p99 by linear interpolation at rank 0.99 * 9 = 8.91: 900 + 0.91 * 100.
    assert m.ttft_ms.mean == pytest.approx(550)
    assert m.ttft_ms.p50 == pytest.approx(550)
    assert m.ttft_ms.p99 == pytest.approx(991)
    # TPOT per request = (latency - TTFT) / (tokens - 1): 20 ms for nine requests, 50 ms for the last.
    assert m.tpot_ms.mean == pytest.approx((9 * 20 + 50) / 10)
    assert m.tpot_ms.p50 == pytest.approx(20)
    assert m.tpot_ms.p99 == pytest.approx(20 + 0.91 * 30)
    # ITL pools every gap: 45 gaps of 20 ms and 10 of 50 ms.
    assert m.itl_ms.mean == pytest.approx((45 * 20 + 10 * 50) / 55)
    assert m.itl_ms.p50 == pytest.approx(20)
    assert m.itl_ms.p99 == pytest.approx(50)
    # E2E latency: 0.12 * (i + 1) s for the first nine, 1.0 + 10 * 0.05 s for the last.
    assert m.e2el_ms.mean == pytest.approx((120 * 45 + 1500) / 10)


def test_one_token_requests_have_no_tpot_or_itl():
    m = serve.compute_metrics([timeline_request(0.3, []), timeline_request(0.5, [])], duration_s=1.0)
    assert m.ttft_ms.mean == pytest.approx(400)
    assert m.tpot_ms is None and m.itl_ms is None
    assert m.total_output_tokens == 2


def test_no_successful_request():
    m = serve.compute_metrics([serve.RequestResult(error="boom")], duration_s=2.0)
    assert (m.completed, m.failed, m.output_throughput) == (0, 1, 0.0)
    assert m.ttft_ms is None and m.e2el_ms is None


def test_parse_metrics_sums_label_sets():
    text = (
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits\n"
        "# TYPE vllm:prefix_cache_hits_total counter\n"
        'vllm:prefix_cache_hits_total{engine="0",model_name="a b {x}"} 12.0\n'
        'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 30\n'
        "vllm:num_requests_running 3\n"
        "process_cpu_seconds_total 1.5e+02\n"
    )
    assert serve.parse_metrics(text) == {
        "vllm:prefix_cache_hits_total": 42.0, "vllm:num_requests_running": 3.0, "process_cpu_seconds_total": 150.0,
    }


def test_random_text_tokenizes_to_the_asked_length(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    random_text = serve.RandomText(tokenizer)
    assert not set(random_text.vocab) & set(tokenizer.all_special_ids)
    rng = random.Random(0)
    for length in (1, 7, 64, 300):
        for _ in range(5):
            text = random_text(length, rng)
            assert len(tokenizer.encode(text, add_special_tokens=False)) == length
    assert random_text(32, random.Random(5)) == random_text(32, random.Random(5))


def test_levels_from_the_flags():
    levels = serve.sweep_levels(parse())
    assert [(lv.concurrency, lv.num_prompts) for lv in levels] == [(1, 8), (4, 8), (16, 32), (64, 128), (256, 512)]
    assert all(lv.request_rate is None for lv in levels)
    capped = serve.sweep_levels(parse("--concurrency", "2", "300", "--max-prompts", "100", "--min-prompts", "3"))
    assert [lv.num_prompts for lv in capped] == [4, 100]
    rates = serve.sweep_levels(parse("--request-rate", "0.5", "2", "--max-concurrency", "8"))
    assert [(lv.concurrency, lv.request_rate, lv.num_prompts) for lv in rates] == [(8, 0.5, 15), (8, 2.0, 60)]
    assert [lv.num_prompts for lv in serve.sweep_levels(parse("--num-prompts", "5"))] == [5] * 5


@pytest.mark.parametrize("argv", [
    ["--input-len", "0"], ["--concurrency", "4", "0"], ["--request-rate", "-1"], ["--num-prompts", "0"],
    ["--min-prompts", "10", "--max-prompts", "5"], ["--extra-body", "{not json"], ["--extra-body", "[1]"],
    ["--max-concurrency", "0"], ["--prompts-per-concurrency", "0"], ["--tokenizer", "/no/such/tokenizer"],
])
def test_bad_flags_are_value_errors(argv):
    with pytest.raises(ValueError):
        serve.validate(parse(*argv))


# ----------------------------------------------------------------------------------------------------------
# End to end against the fake server
# ----------------------------------------------------------------------------------------------------------


def test_sweep_end_to_end(fake, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    results = serve.main(parse(
        "--base-url", fake.base_url, "--tokenizer", tokenizer_dir, "--concurrency", "1", "3",
        "--num-prompts", "6", "--input-len", "12", "--output-len", "5", "--output-json", str(out),
        "--extra-body", '{"top_k": 1}', "--disable-tqdm",
    ))

    assert results["model"] == "fake-model"  # from /v1/models
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    levels = results["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    for lv in levels:
        assert (lv["completed"], lv["failed"], lv["errors"]) == (6, 0, [])
        assert lv["total_input_tokens"] == 6 * 12  # usage: the prompts tokenize to --input-len
        assert lv["total_output_tokens"] == 6 * 5
        assert 50 <= lv["ttft_ms"]["mean"] < 1000  # the server waits 50 ms before the first token
        assert 10 <= lv["itl_ms"]["p50"] < 500  # then 10 ms between tokens
        assert 10 <= lv["tpot_ms"]["mean"] < 500
        assert lv["e2el_ms"]["mean"] >= 50 + 4 * 10
        assert lv["output_throughput"] == pytest.approx(30 / lv["duration_s"])
    # One warm-up request, then level 1 strictly one at a time, then three in flight.
    assert len(fake.payloads) == 13
    assert fake.in_flight_at_start[1:7] == [1] * 6
    assert max(fake.in_flight_at_start[7:]) == 3
    for payload in fake.payloads[1:]:
        assert payload["stream"] and payload["ignore_eos"] and payload["stream_options"] == {"include_usage": True}
        assert (payload["max_tokens"], payload["temperature"], payload["top_k"]) == (5, 0.0, 1)
    assert len({p["prompt"] for p in fake.payloads[1:]}) == 12  # fresh prompts in every level
    printed = capsys.readouterr().out
    assert "| concurrency |" in printed and "TTFT p99" in printed


def test_without_ignore_eos_the_server_stops_early(fake, tokenizer_dir):
    results = serve.main(parse(
        "--base-url", fake.base_url, "--tokenizer", tokenizer_dir, "--concurrency", "2", "--num-prompts", "2",
        "--input-len", "8", "--output-len", "6", "--no-ignore-eos", "--disable-tqdm",
    ))
    assert results["levels"][0]["total_output_tokens"] == 2 * EARLY_EOS
    assert all("ignore_eos" not in p for p in fake.payloads)


def test_poisson_arrivals(fake, tokenizer_dir):
    results = serve.main(parse(
        "--base-url", fake.base_url, "--tokenizer", tokenizer_dir, "--request-rate", "40", "--num-prompts", "8",
        "--input-len", "8", "--output-len", "2", "--disable-tqdm",
    ))
    (level,) = results["levels"]
    assert (level["request_rate"], level["concurrency"], level["completed"]) == (40.0, None, 8)
    # The level's seeded exponential gaps (seed + level index) between its eight arrivals.
    rng = random.Random(0)
    arrivals_span = sum(rng.expovariate(40) for _ in range(7))
    assert arrivals_span > 0.05
    assert level["duration_s"] >= arrivals_span


def test_rejected_requests_are_reported_not_raised(fake, tokenizer_dir, capsys):
    results = serve.main(parse(
        "--base-url", fake.base_url, "--tokenizer", tokenizer_dir, "--concurrency", "2", "--num-prompts", "3",
        "--input-len", "8", "--output-len", "5000", "--disable-tqdm",
    ))
    (level,) = results["levels"]
    assert (level["completed"], level["failed"], level["ttft_ms"]) == (0, 3, None)
    assert level["errors"] == ['HTTP 400: {"error":{"message":"max_tokens too large","type":"BadRequestError"}}']
    assert "0/3" in capsys.readouterr().out


def test_unreachable_server_is_a_value_error(tokenizer_dir):
    with pytest.raises(ValueError, match="no OpenAI-compatible server at http://127.0.0.1:9"):
        serve.main(parse("--base-url", "http://127.0.0.1:9", "--tokenizer", tokenizer_dir, "--disable-tqdm"))


def test_a_wrong_model_fails_at_the_warm_up(fake, tokenizer_dir):
    with pytest.raises(ValueError, match="warm-up request .* failed: HTTP 404"):
        serve.main(parse("--base-url", fake.base_url, "--tokenizer", tokenizer_dir, "--model", "other",
                         "--disable-tqdm"))
