"""The OpenAI app driven in this process, at the ASGI level, over an AsyncLLM with its engine in a thread: what a
real socket cannot stage on cue (a client gone before the first byte of its response)."""

import asyncio
import json

import pytest

from pagedserve import EngineArgs
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
