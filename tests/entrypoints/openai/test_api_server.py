"""The server under abuse, as a demanding production user tries it: malformed input of every class on both
routes (streaming or not), its OpenAPI document fuzzed by schemathesis, the engine process killed, SIGTERM
under load, bad model files and a busy port at start-up, tenant isolation, event-loop blocking."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode
from server_utils import ServerProcess, assert_error, free_port
from transformers import AutoTokenizer

from pagedserve import LLM, SamplingParams

LONG_PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(llama_dir):
    proc = ServerProcess(llama_dir, "--max-num-seqs", "8", "--max-request-body-bytes", "100000")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def reference(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=256)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    return llm.generate(LONG_PROMPT, params, use_tqdm=False)[0].outputs[0].text


def chat(content="hi", **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def completion(prompt="hi", **extra) -> dict:
    return {"prompt": prompt, "max_tokens": 4, **extra}


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

# (route, body, expected status, a fragment of the message)
MALFORMED = [
    ("completions", completion(logit_bias={str(2**63): 1.0}), 400, "logit_bias"),
    ("completions", completion(logit_bias={str(2**64): 1.0}), 400, "logit_bias"),
    ("completions", completion(logit_bias={"100000": 1.0}), 400, "outside the vocabulary"),
    ("completions", completion(logit_bias={"abc": 1.0}), 400, "logit_bias"),
    ("completions", completion(top_k=2**63), 400, "top_k"),
    ("completions", completion(top_k=2**64), 400, "top_k"),
    ("completions", completion(stop_token_ids=[2**63]), 400, "stop_token_ids"),
    ("completions", completion(stop_token_ids=[2**64]), 400, "stop_token_ids"),
    ("completions", completion(stop_token_ids=[100000]), 400, "outside the vocabulary"),
    ("completions", completion(seed=2**70), 400, "seed"),
    ("completions", completion(n=2**64), 400, "n"),
    ("completions", completion(n=9, temperature=1.0), 400, "max_num_seqs"),
    ("completions", completion(max_tokens=2**64), 400, "max"),
    ("completions", completion(min_tokens=2**64), 400, "min_tokens"),
    ("completions", completion(prompt=[5, 2**63]), 400, "token ids"),
    ("completions", completion(prompt=[5, -1]), 400, "token ids"),
    ("completions", completion(prompt=[True, False]), 400, "prompt"),  # JSON booleans are not token ids 1 and 0
    ("completions", completion(prompt=[[5, 6], [True]]), 400, "prompt"),
    ("completions", completion(prompt=[5, 6.0]), 400, "prompt"),
    ("completions", completion(stop_token_ids=[True]), 400, "stop_token_ids"),
    ("completions", completion(stop=[f"s{i}" for i in range(65)]), 400, "stop"),
    ("completions", completion(stop="s" * 257), 400, "stop"),
    ("chat/completions", chat(stop=[f"s{i}" for i in range(65)]), 400, "stop"),
    ("completions", completion(prompt="abc\ud800"), 400, "surrogate"),
    ("completions", completion(stop=["x\udfff"]), 400, "surrogate"),
    ("completions", completion(temperature="hot"), 400, "temperature"),
    ("completions", completion(stream_options={"include_usage": True}), 400, "stream_options"),
    ("completions", completion(response_format={"type": "json_schema"}), 400, "json_schema"),
    ("completions", completion(structured_outputs={"regex": "a+", "choice": ["a"]}), 400, "exactly one"),
    ("completions", completion(structured_outputs={"regexp": "a+"}), 400, "regexp"),
    ("completions", completion(max_tokens=1000), 400, "maximum context length"),
    ("chat/completions", chat("abc\ud800"), 400, "surrogate"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "42"}]}, 400, "tool_call_id"),
    ("chat/completions", {"messages": [{"role": "user"}]}, 400, "content"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", chat(tool_choice="required"), 400, "needs at least one tool"),
    ("chat/completions", chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
     400, "nope"),
    ("chat/completions", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}], tool_choice="required"), 400, "parameters"),
    ("chat/completions", chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), 400, "name"),
    ("chat/completions", chat(chat_template="{{ messages }}"), 400, "trust-request-chat-template"),
    ("chat/completions", chat(tools=[WEATHER]), 400, "enable-auto-tool-choice"),
    ("chat/completions", chat(logit_bias={"100000": 1.0}), 400, "outside the vocabulary"),
    ("chat/completions", chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("chat/completions", chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}), 400, "schema"),
]


def test_malformed_input_is_a_4xx_in_openai_shape(server, reference):
    """Every class, both routes, streaming and not (admission happens before the response starts, so a
    stream gets the real status too); the server stays healthy and a neighbour in flight is unharmed."""
    neighbour: dict = {}

    def run_neighbour() -> None:
        body = {"prompt": LONG_PROMPT, "max_tokens": 60, "temperature": 0, "ignore_eos": True}
        neighbour["text"] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()[
            "choices"][0]["text"]

    thread = threading.Thread(target=run_neighbour)
    thread.start()
    for route, body, status, fragment in MALFORMED:
        for stream in (False, True):
            if "stream_options" in body and stream:
                continue  # valid with stream
            payload = {**body, "stream": True} if stream else body
            resp = httpx.post(f"{server.url}/v1/{route}", content=json.dumps(payload),  # escapes surrogates
                              headers={"content-type": "application/json"}, timeout=30)
            assert resp.status_code == status, (route, payload, resp.text)
            assert_error(resp, status, fragment)
            assert httpx.get(f"{server.url}/health").status_code == 200
    thread.join(timeout=120)
    assert neighbour["text"] == reference
    assert server.metrics()["vllm:kv_cache_usage_perc"] == 0  # nothing leaked


def test_errors_outside_the_routes_are_in_openai_shape(server):
    assert_error(httpx.get(f"{server.url}/v1/nowhere"), 404, "Not Found")
    assert_error(httpx.get(f"{server.url}/v1/completions"), 405, "Method Not Allowed")
    assert_error(httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "\xff\xfe"}',
                            headers={"content-type": "application/json"}), 400, "")
    assert_error(httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                            headers={"content-type": "application/json"}), 400, "JSON")
    big = {"prompt": "x" * 200_000}
    start = time.monotonic()
    assert_error(httpx.post(f"{server.url}/v1/completions", json=big), 413, "larger than 100000 bytes")
    assert time.monotonic() - start < 2


def test_openapi_document_lists_the_real_statuses(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    for route in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][route]["post"]["responses"]
        assert {"200", "400", "401", "404", "503"} <= set(responses) and "422" not in responses
        assert "text/event-stream" in responses["200"]["content"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis(server, mode):
    """A bounded fuzz of every operation in the OpenAPI document: no server error, no undocumented status,
    content type or body shape."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    statuses: dict[str, list[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == GenerationMode.NEGATIVE and not len(operation.body):
            continue  # nothing to make invalid

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=60, deadline=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            response = case.call_and_validate(base_url=server.url, checks=checks, timeout=60)
            statuses.setdefault(case.operation.label, []).append(response.status_code)

        run()
    for route in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert len(statuses[route]) >= 30 and 400 in statuses[route]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_tokenizing_a_big_prompt_does_not_block_the_event_loop(server):
    """A prompt near the body limit is tokenized on a worker thread: /health answers meanwhile."""
    body = {"prompt": "héllo wörld " * 7000, "max_tokens": 1}  # ~90 KB of text, far over max_model_len

    async def main() -> tuple[int, float]:
        async with httpx.AsyncClient(timeout=60) as client:
            big = asyncio.create_task(client.post(f"{server.url}/v1/completions", json=body))
            await asyncio.sleep(0.05)
            start = time.monotonic()
            health = await client.get(f"{server.url}/health")
            latency = time.monotonic() - start
            resp = await big
            return resp.status_code, latency, health.status_code

    status, latency, health = asyncio.run(main())
    assert status == 400 and health == 200 and latency < 1.0


def engine_pid(server: ServerProcess) -> int:
    """The engine process: the server's child started by multiprocessing (not its resource tracker)."""
    pid = server.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            cmdline = f.read()
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            return child
    raise AssertionError(f"no engine process among {children}")


def test_engine_killed_mid_stream_is_restarted(llama_dir):
    proc = ServerProcess(llama_dir)
    try:
        body = {"prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=60) as resp:
            iterator = resp.iter_lines()
            assert next(line for line in iterator if line.startswith("data:"))
            os.kill(engine_pid(proc), signal.SIGKILL)
            start = time.monotonic()
            rest = [line for line in iterator if line]
        assert time.monotonic() - start < 5
        assert rest[-1] == "data: [DONE]" and "engine died" in rest[-2]
        # meanwhile: 503s at once, in OpenAI's shape; gauges say nothing runs
        assert_error(httpx.get(f"{proc.url}/health"), 503, "engine")
        start = time.monotonic()
        assert_error(httpx.post(f"{proc.url}/reset_prefix_cache", timeout=10), 503, "engine")
        assert_error(httpx.post(f"{proc.url}/v1/completions", json={**body, "stream": False}), 503, "engine")
        assert_error(httpx.post(f"{proc.url}/v1/completions", json=body), 503, "engine")
        assert time.monotonic() - start < 3
        assert proc.metrics()["vllm:num_requests_running"] == 0
        deadline = time.monotonic() + 60
        while httpx.get(f"{proc.url}/health").status_code != 200:
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.2)
        resp = httpx.post(f"{proc.url}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
        assert httpx.post(f"{proc.url}/reset_prefix_cache").status_code == 200
    finally:
        assert proc.stop() == 0


def test_a_restarted_engine_keeps_the_log_level(llama_dir):
    """--log-level reaches the engine process started after a death too: its debug lines (a grammar compiled)
    still show."""
    proc = ServerProcess(llama_dir, "--log-level", "debug")
    body = {"prompt": "x", "max_tokens": 3, "response_format": {"type": "json_object"}}
    try:
        assert httpx.post(f"{proc.url}/v1/completions", json=body, timeout=30).status_code == 200
        assert proc.output().count("compiled a json_object grammar") == 1, proc.output()
        os.kill(engine_pid(proc), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while httpx.get(f"{proc.url}/health").status_code == 200:  # noticed within half a second
            assert time.monotonic() < deadline
            time.sleep(0.1)
        while httpx.get(f"{proc.url}/health").status_code != 200:  # restarted
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.2)
        assert httpx.post(f"{proc.url}/v1/completions", json=body, timeout=30).status_code == 200
        assert proc.output().count("compiled a json_object grammar") == 2, proc.output()
    finally:
        assert proc.stop() == 0


def test_an_engine_that_keeps_dying_stops_the_server_non_zero(llama_dir):
    proc = ServerProcess(llama_dir, "--max-engine-restarts", "0")
    os.kill(engine_pid(proc), signal.SIGKILL)
    assert proc.proc.wait(timeout=20) == 1
    assert "giving up" in proc.output() and "Traceback" not in proc.output()


def test_sigterm_under_load():
    """32 streams in flight at SIGTERM (the default model: slow enough that the grace period ends first): each
    ends with [DONE], after its last token or a final error event; the server exits 0 soon after the grace
    period and logs no traceback."""
    proc = ServerProcess(None, "--shutdown-timeout", "1", sizes=("--max-model-len", "512", "--num-kv-blocks", "256"))
    body = {"prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True}

    async def one(client: httpx.AsyncClient, started: asyncio.Event) -> list[str]:
        async with client.stream("POST", f"{proc.url}/v1/completions", json=body) as resp:
            lines = []
            async for line in resp.aiter_lines():
                if line:
                    lines.append(line)
                    started.set()
            return lines

    async def main() -> list[list[str]]:
        started = asyncio.Event()
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [asyncio.create_task(one(client, started)) for _ in range(32)]
            await started.wait()
            await asyncio.sleep(0.5)
            proc.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    try:
        start = time.monotonic()
        results = asyncio.run(main())
        for lines in results:
            assert lines[-1] == "data: [DONE]"
            last = json.loads(lines[-2].removeprefix("data: "))
            assert "shutting down" in last["error"]["message"] or last["choices"][0]["finish_reason"] == "length"
        assert sum("error" in json.loads(lines[-2].removeprefix("data: ")) for lines in results) > 16
        assert proc.proc.wait(timeout=30) == 0 and time.monotonic() - start < 20
        assert "Traceback" not in proc.output() and "ZMQError" not in proc.output()
    finally:
        proc.stop()


def serve_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", *args], capture_output=True,
                          text=True, timeout=120)


def test_bad_model_fails_start_up_in_one_line(tmp_path, llama_dir):
    missing = serve_command(str(tmp_path / "missing"), "--port", str(free_port()))
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: model")
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(llama_dir):
        if name != "model.safetensors":
            os.symlink(os.path.join(llama_dir, name), broken / name)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    for placement in ("process", "thread"):
        result = serve_command(str(broken), "--port", str(free_port()), "--engine-placement", placement)
        assert result.returncode == 1, result.stderr
        output = result.stdout + result.stderr
        assert "Traceback" not in output and "safetensor" in output.lower(), output


def test_port_in_use_fails_before_the_model_loads(llama_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        start = time.monotonic()
        result = serve_command(llama_dir, "--port", str(busy.getsockname()[1]))
    assert result.returncode == 2 and "cannot listen on" in result.stderr
    assert "KV cache" not in result.stderr and time.monotonic() - start < 15


def test_tenant_isolation(llama_dir):
    """The admin route needs the key; cached_tokens is off unless asked for; a request's chat template needs
    --trust-request-chat-template."""
    proc = ServerProcess(llama_dir, "--api-key", "k", "--engine-placement", "thread")
    try:
        auth = {"Authorization": "Bearer k"}
        assert_error(httpx.post(f"{proc.url}/reset_prefix_cache"), 401, "API key")
        assert httpx.post(f"{proc.url}/reset_prefix_cache", headers=auth).status_code == 200
        assert httpx.get(f"{proc.url}/health").status_code == 200 and httpx.get(f"{proc.url}/metrics").is_success
        body = {"prompt": list(range(5, 45)), "max_tokens": 1}
        for _ in range(2):
            usage = httpx.post(f"{proc.url}/v1/completions", json=body, headers=auth).json()["usage"]
            assert "prompt_tokens_details" not in usage
    finally:
        assert proc.stop() == 0
    proc = ServerProcess(llama_dir, "--engine-placement", "thread", "--trust-request-chat-template")
    try:
        template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        resp = httpx.post(f"{proc.url}/v1/chat/completions", json=chat("hello", chat_template=template,
                                                                         return_token_ids=True))
        assert resp.status_code == 200
        expected = AutoTokenizer.from_pretrained(llama_dir).encode("hello", add_special_tokens=False)
        assert resp.json()["choices"][0]["prompt_token_ids"] == expected
    finally:
        assert proc.stop() == 0
