"""A small fake OpenAI-compatible streaming server, run in a thread on a free loopback port.

It streams one chunk per token with fixed delays, counts prompt tokens with a real tokenizer, honours
`ignore_eos` (without it, "EOS" comes after EARLY_EOS tokens), sends `usage` when asked, and keeps
vLLM-named counters at /metrics (half of every chat prompt counts as a prefix-cache hit).
"""

import asyncio
import contextlib
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

EARLY_EOS = 3
MAX_TOKENS_LIMIT = 1000  # larger max_tokens: HTTP 400, as a server rejects a bad request


class FakeOpenAIServer:
    def __init__(self, tokenizer, ttft_s: float, itl_s: float):
        self.tokenizer, self.ttft_s, self.itl_s = tokenizer, ttft_s, itl_s
        self.payloads: list[dict] = []
        self.in_flight = 0
        self.in_flight_at_start: list[int] = []  # per streamed request, itself included
        self.counters = {"vllm:prompt_tokens_total": 0, "vllm:prefix_cache_queries_total": 0,
                         "vllm:prefix_cache_hits_total": 0}
        self.app = self._build_app()

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            return {}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

        @app.get("/metrics")
        async def metrics():
            lines = []
            for name, value in self.counters.items():
                lines += [f"# TYPE {name} counter", f'{name}{{engine="0",model_name="fake-model"}} {value}.0']
            return PlainTextResponse("\n".join(lines) + "\n")

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            return self._respond(body, self._count(body["prompt"]), chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            prompt_tokens = sum(self._count(m["content"]) for m in body["messages"])
            self.counters["vllm:prefix_cache_queries_total"] += prompt_tokens
            self.counters["vllm:prefix_cache_hits_total"] += prompt_tokens // 2
            return self._respond(body, prompt_tokens, chat=True)

        return app

    def _respond(self, body: dict, prompt_tokens: int, chat: bool):
        self.payloads.append(body)
        if body["model"] != "fake-model":
            return JSONResponse({"error": {"message": f"model {body['model']} does not exist"}}, 404)
        if body["max_tokens"] > MAX_TOKENS_LIMIT:
            return JSONResponse({"error": {"message": "max_tokens too large", "type": "BadRequestError"}}, 400)
        self.counters["vllm:prompt_tokens_total"] += prompt_tokens
        n = body["max_tokens"] if body.get("ignore_eos") else min(body["max_tokens"], EARLY_EOS)
        usage = body.get("stream_options", {}).get("include_usage")

        def chunk(text: str | None, finish: str | None = None) -> str:
            choice = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text} if text is not None else {"role": "assistant", "content": ""}
            else:
                choice["text"] = text or ""
            return f"data: {json.dumps({'choices': [choice]})}\n\n"

        async def stream():
            self.in_flight += 1
            self.in_flight_at_start.append(self.in_flight)
            try:
                if chat:
                    yield chunk(None)  # the role-only first chunk carries no token
                await asyncio.sleep(self.ttft_s)
                for i in range(n):
                    if i:
                        await asyncio.sleep(self.itl_s)
                    yield chunk(f" w{i}")
                yield chunk("", "length" if n == body["max_tokens"] else "stop")
                if usage:
                    total = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                             "total_tokens": prompt_tokens + n}
                    yield f"data: {json.dumps({'choices': [], 'usage': total})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")


@contextlib.contextmanager
def serving(fake: FakeOpenAIServer):
    """Run `fake` in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started, "the fake server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
