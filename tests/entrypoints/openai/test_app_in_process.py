"""The OpenAI app driven in this process, at the ASGI level, over an AsyncLLM with its engine in a thread: what a
real socket cannot stage on cue (a client gone before the first byte of its response, a prompt that takes long to
render, a request refused before its text is touched)."""

import asyncio
import dataclasses
import json
import threading

import httpx
import pytest

from pagedserve import EngineArgs, SamplingParams
from pagedserve.entrypoints.openai.api_server import build_app
from pagedserve.entrypoints.openai.serving import ServingOptions
from pagedserve.frontend.async_llm import AsyncLLM


@pytest.fixture(scope="module")
def args(llama_dir):
    return EngineArgs(model=llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64)


def scope_for(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": b"", "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}


async def call_gone_client(app, path: str, body: dict) -> None:
    """A client whose connection is gone by the time its response starts (the server's send raises, as
    uvicorn's does)."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await asyncio.Event().wait()  # the disconnect is noticed by the failed send
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            raise OSError("the client is gone")

    try:
        await app(scope_for(path), receive, send)
    except Exception:  # noqa: BLE001 - what the server does with it is not the point
        pass


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": ["a", "b"]}),
])
def test_a_stream_whose_client_left_before_it_started_is_aborted(args, path, body):
    async def main():
        engine = AsyncLLM(args, "thread")
        await engine.start()
        try:
            app = build_app(engine, ServingOptions(model_name="m"))
            await call_gone_client(app, path, {**body, "stream": True, "max_tokens": 200, "ignore_eos": True})
            await asyncio.sleep(0)
            return dict(engine.streams), engine.num_unfinished_requests, await engine.engine_stats()
        finally:
            await engine.shutdown()

    streams, unfinished, stats = asyncio.run(main())
    assert streams == {} and unfinished == 0
    assert stats.num_requests_running == stats.num_requests_waiting == 0


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


def chat(content: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def test_a_request_the_engine_cannot_take_is_refused_before_its_text_is_worked_on(args):
    """A full waiting queue or a dead engine: a 503 at once, the prompt never rendered nor tokenized."""

    async def main():
        engine = AsyncLLM(dataclasses.replace(args, max_num_seqs=1), "thread", max_waiting_requests=0)
        await engine.start()
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        running = engine.add_request(engine.input_processor.make_request("x", params, "running"))
        texts: list[str] = []
        real_encode, real_render = engine.input_processor.encode, engine.tokenizer.apply_chat_template
        engine.input_processor.encode = lambda text, *a, **k: texts.append(text) or real_encode(text, *a, **k)
        engine.tokenizer.apply_chat_template = lambda m, *a, **k: texts.append("chat") or real_render(m, *a, **k)
        statuses = []
        try:
            async with client_for(build_app(engine, ServingOptions(model_name="m"))) as client:
                for down in (None, "down for the test"):  # the queue is full; then the engine is down too
                    engine.errored = down
                    for stream in (False, True):
                        statuses.append((await client.post("/v1/completions", json={
                            "prompt": "hello", "max_tokens": 2, "stream": stream})).status_code)
                        statuses.append((await client.post("/v1/chat/completions",
                                                           json=chat("hello", stream=stream))).status_code)
                engine.errored = None
            return statuses, texts
        finally:
            await running.aclose()
            await engine.shutdown()

    statuses, texts = asyncio.run(main())
    assert statuses == [503] * 8 and texts == []


def test_a_slow_prompt_does_not_hold_up_the_others(args):
    """Text work runs on a pool of threads: while one request's chat template takes its time, another's is
    rendered, tokenized and answered."""

    async def main():
        engine = AsyncLLM(args, "thread")
        await engine.start()
        release = threading.Event()
        real_render = engine.tokenizer.apply_chat_template

        def render(messages, *a, **k):
            if messages[0]["content"] == "slow":
                release.wait(30)
            return real_render(messages, *a, **k)

        engine.tokenizer.apply_chat_template = render
        try:
            async with client_for(build_app(engine, ServingOptions(model_name="m"))) as client:
                slow = asyncio.create_task(client.post("/v1/chat/completions", json=chat("slow")))
                await asyncio.sleep(0.2)
                fast = await asyncio.wait_for(client.post("/v1/chat/completions", json=chat("fast")), 10)
                release.set()
                return fast.status_code, (await slow).status_code
        finally:
            release.set()
            await engine.shutdown()

    assert asyncio.run(main()) == (200, 200)
