"""A real `pagedserve serve` process on a free loopback port, as clients see it, and error-shape checks; the app in
process, for what needs no socket."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pagedserve import EngineArgs
from pagedserve.entrypoints.openai.api_server import build_app
from pagedserve.entrypoints.openai.serving import ServingOptions
from pagedserve.frontend.async_llm import AsyncLLM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = ("--dtype", "float32", "--max-model-len", "256", "--num-kv-blocks", "256")  # for the tiny checkpoints


class ServerProcess:
    def __init__(self, model: str | None, *flags: str, sizes: tuple[str, ...] = TINY, port: int | None = None) -> None:
        """`model` None: the default model; `port` None: a free one."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = tempfile.TemporaryDirectory()  # /v1/responses' store: not the user's (flags may name one)
        args = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", *([model] if model else []),
                "--port", str(self.port), *sizes, "--log-interval", "1",
                "--responses-store", f"sqlite:///{self.store.name}/responses.db", *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # a pipe nobody reads would fill and block
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("server did not become ready")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def metrics(self) -> dict[str, float]:
        """/metrics -> {sample name: value summed over labels}, parsed by prometheus_client."""
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics").text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return values

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.store.cleanup()
        return self.proc.returncode


def assert_error(resp: httpx.Response, status: int, fragment: str) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error["message"]
    return error


@contextlib.asynccontextmanager
async def in_process_app(model: str) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncLLM]]:
    """The OpenAI app over an AsyncLLM with its engine in a thread (tiny sizes, float32), driven at the ASGI level
    by an httpx client: no socket, no server process."""
    engine = AsyncLLM(EngineArgs(model=model, dtype="float32", max_model_len=256, num_kv_blocks=64), "thread")
    await engine.start()
    try:
        transport = httpx.ASGITransport(app=build_app(engine, ServingOptions(model_name="m")))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client, engine
    finally:
        await engine.shutdown()
