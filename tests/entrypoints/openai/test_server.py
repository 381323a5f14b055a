"""The OpenAI server as clients see it: a real `pagedserve serve` process on a free loopback port (tiny random
checkpoint), driven by the official `openai` client, and raw httpx for malformed input."""

import asyncio
import signal
import time

import httpx
import openai
import pytest
from server_utils import ServerProcess, assert_error

from pagedserve import LLM, SamplingParams


@pytest.fixture(scope="module", params=["thread", "process"])
def server(request, llama_dir):
    proc = ServerProcess(llama_dir, "--engine-placement", request.param, "--enable-prompt-tokens-details")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def offline(llama_dir):
    return LLM(llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=256)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def model_name(server) -> str:
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


PROMPTS = ["The quick brown fox", "Paged attention keeps", "def add(a, b):", "Héllo wörld"]


def greedy(offline, prompt, max_tokens=12):
    return offline.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]


def test_models_health_version(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1 and models["data"][0]["max_model_len"] == 256
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_completion_equals_offline(server, client, offline):
    for prompt in PROMPTS:
        ref = greedy(offline, prompt)
        resp = client.completions.create(model=model_name(server), prompt=prompt, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
        (choice,) = resp.choices
        assert choice.token_ids == ref.token_ids
        assert choice.text == ref.text and choice.finish_reason == "length"
        assert resp.usage.completion_tokens == 12
        assert resp.usage.prompt_tokens == len(offline.get_tokenizer().encode(prompt))
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


def test_completion_stream_equals_offline(server, client, offline):
    for prompt in PROMPTS:  # random weights: multi-byte characters get split across tokens
        ref = greedy(offline, prompt)
        stream = client.completions.create(model=model_name(server), prompt=prompt, max_tokens=12, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == ref.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_token_id_prompts_and_batches(server, client, offline):
    ids = offline.get_tokenizer().encode(PROMPTS[1])
    ref = greedy(offline, {"prompt_token_ids": ids}, 6)
    resp = client.completions.create(model=model_name(server), prompt=[ids, ids[:3]], max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].token_ids == ref.token_ids
    assert resp.choices[1].token_ids == greedy(offline, {"prompt_token_ids": ids[:3]}, 6).token_ids
    assert resp.usage.prompt_tokens == len(ids) + 3
    strings = client.completions.create(model=model_name(server), prompt=PROMPTS[:3], max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert [c.text for c in strings.choices] == [greedy(offline, p, 4).text for p in PROMPTS[:3]]


def test_chat_equals_offline(server, client, offline):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Paged attention?"}]
    ref = offline.chat(messages, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    resp = client.chat.completions.create(model=model_name(server), messages=messages, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids) and resp.usage.completion_tokens == 10
    # text parts are joined like a string content
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "Paged "},
                                                       {"type": "text", "text": "attention?"}]}]
    stream = client.chat.completions.create(model=model_name(server), messages=parts, max_completion_tokens=10,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_and_seed(server, client):
    kwargs = dict(model=model_name(server), prompt=PROMPTS[0], max_tokens=8, temperature=1.0, n=2, seed=7,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    first = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert all(len(c.token_ids) == 8 for c in first.choices)
    assert first.usage.completion_tokens == 16
    again = client.completions.create(**kwargs)
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in first.choices]
    chat = client.chat.completions.create(model=model_name(server), messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, n=2, seed=3)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_stop_string_never_streamed(server, client, offline):
    full = greedy(offline, PROMPTS[0], 20).text
    stop = full[4:7]
    expected = full[: full.index(stop)]
    resp = client.completions.create(model=model_name(server), prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                     stop=[stop], extra_body={"ignore_eos": True})
    assert resp.choices[0].text == expected and resp.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=model_name(server), prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                       stop=stop, stream=True, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].text for c in stream]
    streamed = ""
    for piece in pieces:
        streamed += piece
        assert stop not in streamed  # not even for a moment
    assert streamed == expected


def test_logprobs(server, client, offline):
    ref = offline.generate(PROMPTS[2], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2),
                           use_tqdm=False)[0].outputs[0]
    ref_chosen = [entry[t].logprob for entry, t in zip(ref.logprobs, ref.token_ids)]
    resp = client.completions.create(model=model_name(server), prompt=PROMPTS[2], max_tokens=5, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref_chosen, abs=1e-5)
    assert "".join(lp.tokens) == resp.choices[0].text
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model=model_name(server), messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the chosen is the top one


def test_concurrent_streams(server, offline):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(64)]
    expected = [greedy(offline, p, 10).text for p in prompts]

    async def one(client, prompt):
        stream = await client.completions.create(model=model_name(server), prompt=prompt, max_tokens=10,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(main()) == expected
    assert server.metrics()["vllm:num_requests_running"] == 0


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": model_name(server), "prompt": PROMPTS[0], "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.metrics()["vllm:kv_cache_usage_perc"] > 0  # still generating
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if metrics["vllm:kv_cache_usage_perc"] == 0 and metrics["vllm:num_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert metrics["vllm:kv_cache_usage_perc"] == 0 and metrics["vllm:num_requests_running"] == 0
    assert metrics["vllm:generation_tokens_total"] > 0


def test_bad_requests_are_400_in_openai_shape(server):
    url = f"{server.url}/v1/completions"
    name = model_name(server)
    error = assert_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400,
                         "JSON")
    assert error["type"] == "invalid_request_error"
    assert assert_error(httpx.post(url, json={"model": name, "prompt": "x", "max_tokens": "many"}), 400,
                        "max_tokens")["param"] == "max_tokens"
    assert_error(httpx.post(url, json={"model": name}), 400, "prompt")
    assert_error(httpx.post(url, json={"model": name, "prompt": "x", "temperature": -1}), 400, "temperature")
    assert_error(httpx.post(url, json={"model": name, "prompt": [5, 10**6]}), 400, "token ids")
    assert_error(httpx.post(url, json={"model": name, "prompt": ""}), 400, "empty")
    too_long = assert_error(httpx.post(url, json={"model": name, "prompt": [5] * 200, "max_tokens": 100}), 400,
                            "maximum context length is 256 tokens")
    assert "300" in too_long["message"] and "200 in the prompt" in too_long["message"]
    chat = f"{server.url}/v1/chat/completions"
    assert_error(httpx.post(chat, json={"model": name, "messages": []}), 400, "messages")
    assert_error(httpx.post(chat, json={"model": name, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}), 400, "image_url")
    assert_error(httpx.post(chat, json={"model": name, "messages": [{"role": "user", "content": "x"}], "n": 2,
                                        "temperature": 0}), 400, "greedy")
    error = assert_error(httpx.post(url, json={"model": "gpt-17", "prompt": "x"}), 404, "gpt-17")
    assert error["code"] == "model_not_found"
    # the server is still fine
    assert httpx.post(url, json={"model": name, "prompt": "x", "max_tokens": 2}).status_code == 200
    assert server.metrics()["vllm:kv_cache_usage_perc"] == 0


def test_prefix_cache_hits_salt_and_reset(server):
    url = f"{server.url}/v1/completions"
    body = {"model": model_name(server), "prompt": list(range(5, 45)), "max_tokens": 1}
    assert httpx.post(f"{server.url}/reset_prefix_cache").status_code == 200
    hits = server.metrics()["vllm:prefix_cache_hits_total"]
    assert httpx.post(url, json=body).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert httpx.post(url, json=body).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    assert httpx.post(url, json={**body, "cache_salt": "other"}).json()["usage"]["prompt_tokens_details"][
        "cached_tokens"] == 0
    assert server.metrics()["vllm:prefix_cache_hits_total"] == hits + 32
    assert httpx.post(f"{server.url}/reset_prefix_cache").status_code == 200
    assert httpx.post(url, json=body).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_api_key_and_sigterm(llama_dir):
    proc = ServerProcess(llama_dir, "--api-key", "s3cret", "--engine-placement", "thread")
    try:
        url = f"{proc.url}/v1/models"
        error = assert_error(httpx.get(url), 401, "API key")
        assert error["type"] == "invalid_request_error"
        assert_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401, "API key")
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{proc.url}/health").status_code == 200  # not under /v1
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model=llama_dir, prompt="x", max_tokens=2).choices[0].text is not None
    finally:
        assert proc.stop() == 0


def test_bounded_waiting_queue_503(llama_dir):
    proc = ServerProcess(llama_dir, "--max-num-seqs", "1", "--max-waiting-requests", "0")
    body = {"model": llama_dir, "prompt": "x", "max_tokens": 240, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{proc.url}/v1/completions", json=body) for _ in range(8)))

    try:
        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert statuses[0] == 200 and statuses[-1] == 503, statuses  # one runs, the burst behind it is refused
        for resp in responses:
            if resp.status_code != 200:
                assert assert_error(resp, 503, "capacity")["type"] == "service_unavailable"
        assert proc.metrics()["vllm:kv_cache_usage_perc"] == 0
    finally:
        assert proc.stop() == 0


def test_sigterm_with_a_request_in_flight_exits_cleanly(llama_dir):
    """A stream still running at the end of the grace period (none here) gets a final error event and [DONE];
    the server exits 0, without tracebacks."""
    proc = ServerProcess(llama_dir, "--shutdown-timeout", "0")
    body = {"model": llama_dir, "prompt": "x", "max_tokens": 240, "stream": True, "ignore_eos": True}
    lines = []
    try:
        with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=60) as resp:
            iterator = resp.iter_lines()
            lines.append(next(line for line in iterator if line.startswith("data:")))
            proc.proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            lines.extend(line for line in iterator if line)
        assert lines[-1] == "data: [DONE]" and "shutting down" in lines[-2], lines[-3:]
        assert proc.proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 10
        assert "Traceback" not in proc.output() and "ZMQError" not in proc.output()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{proc.url}/health", timeout=2)  # no longer accepting
    finally:
        proc.stop()


def test_sessions_through_the_server(server, client):
    """session_id / kv_retention_s / priority as extra body fields; the next turn hits the lease; close."""
    session = f"agent-{server.port}"
    messages = [{"role": "user", "content": "Paged attention keeps the KV cache in fixed-size blocks."}]
    first = client.chat.completions.create(model=model_name(server), messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"session_id": session, "ignore_eos": True})
    before = server.metrics()
    assert before["pagedserve:session_leases"] >= 1 and before["pagedserve:kv_blocks_leased"] >= 1
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And with block tables?"}]
    client.chat.completions.create(model=model_name(server), messages=messages, max_tokens=4, temperature=0,
                                   extra_body={"session_id": session, "priority": 2, "kv_retention_s": 30})
    after = server.metrics()
    assert after["pagedserve:lease_hit_tokens_total"] - before.get("pagedserve:lease_hit_tokens_total", 0) >= 16
    assert httpx.post(f"{server.url}/v1/sessions/{session}/close").json()["closed"] is True
    assert_error(httpx.post(f"{server.url}/v1/sessions/{session}/close"), 404, session)
    assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "kv_retention_s": -1,
                                                                   "session_id": "s"}), 400, "kv_retention_s")
    assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "kv_retention_s": 5}), 400,
                 "needs a session_id")


def test_a_session_is_closed_only_by_its_tenant(server, client):
    """A session belongs to its cache_salt: a close naming another salt (or none) finds no session."""
    session = f"tenant-{server.port}"
    client.completions.create(model=model_name(server), prompt="The quick brown fox " * 5, max_tokens=2,
                              extra_body={"session_id": session, "cache_salt": "tenant-a"})
    url = f"{server.url}/v1/sessions/{session}/close"
    assert_error(httpx.post(url), 404, session)
    assert_error(httpx.post(url, json={"cache_salt": "tenant-b"}), 404, session)
    assert_error(httpx.post(url, json={"cache_salt": 5}), 400, "cache_salt")
    assert httpx.post(url, json={"cache_salt": "tenant-a"}).json()["closed"] is True


def test_the_readme_example_on_the_default_model():
    """`make serve`'s example, "What is the capital of France?", on the bundled model: sampled with its authors'
    recommended defaults (temperature 0.2, top_p 0.9, from the generation config shipped for it), most seeded answers
    name Paris (at temperature 1.0 most are gibberish); a request's own temperature wins over the default."""
    proc = ServerProcess(None, sizes=("--max-model-len", "512", "--num-kv-blocks", "256"))
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    async def ask(client: httpx.AsyncClient, seed: int, **extra) -> str:
        body = {"messages": messages, "max_tokens": 24, "seed": seed, **extra}
        resp = await client.post(f"{proc.url}/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["message"]["content"]

    async def main() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(timeout=300) as client:
            defaults = await asyncio.gather(*(ask(client, seed) for seed in range(20)))
            greedy = await asyncio.gather(*(ask(client, seed, temperature=0) for seed in range(3)))
            return defaults, greedy

    try:
        defaults, greedy = asyncio.run(main())
        assert "sampling defaults from the model's generation config" in proc.output()
    finally:
        assert proc.stop() == 0
    assert sum("Paris" in text for text in defaults) >= 11, defaults  # 13 of 20 here; 6 of 20 at temperature 1.0
    assert len(set(defaults)) > 1  # sampled, not greedy
    assert len(set(greedy)) == 1 and "Paris" in greedy[0]  # temperature 0 asked for: greedy whatever the seed
