"""Where the engine core's busy loop runs, seen from the asyncio front end: a thread or its own process.

Either way the front end sends messages (add, abort, a utility call) and receives one
`EngineCoreOutputs` per engine step, delivered to a callback on the asyncio loop.
- `ThreadCoreClient`: the loop runs in a thread of this process; messages are Python objects on a queue.
- `ProcessCoreClient`: the loop runs in a spawned process (as vLLM v1); messages are msgspec-encoded
  msgpack over ZeroMQ IPC sockets, so HTTP handling and detokenization never hold the model's GIL.
"""

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from pagedserve.config import EngineConfig, create_engine_config
from pagedserve.core.engine_core import EngineCore, EngineCoreOutput
from pagedserve.engine_args import EngineArgs
from pagedserve.frontend.engine_process import EngineProcess
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve")


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]


class AbortSamples(msgspec.Struct, tag=True):
    """Single samples of n > 1 requests, as (request id, index)."""

    samples: list[tuple[str, int]]


class UtilityCall(msgspec.Struct, tag=True):
    """Call an EngineCore method by name (e.g. reset_prefix_cache); the result comes back with an output."""

    call_id: int
    method: str


class Shutdown(msgspec.Struct, tag=True):
    pass


EngineCoreRequest = AddRequest | AbortRequests | AbortSamples | UtilityCall | Shutdown


class EngineCoreOutputs(msgspec.Struct):
    outputs: list[EngineCoreOutput]
    stats: dict[str, float]
    utility_results: list[tuple[int, Any]] = []


class EngineReady(msgspec.Struct):
    """First message from a core process: it has loaded the model (or failed to, with `error`)."""

    error: str | None = None


def run_engine_loop(
    core: EngineCore, receive: Callable[[bool], list[EngineCoreRequest]], send: Callable[[EngineCoreOutputs], None]
) -> None:
    """The busy loop: take the messages that arrived, run one step if there is work, send what came out.

    `receive(block)` blocks for the next message when the engine is idle, and only drains when busy.
    """
    while True:
        messages = receive(not core.has_unfinished_requests())
        outputs: list[EngineCoreOutput] = []
        results: list[tuple[int, Any]] = []
        for message in messages:
            if isinstance(message, Shutdown):
                return
            if isinstance(message, AddRequest):
                try:
                    core.add_request(message.request_id, message.prompt_token_ids, message.params, message.cache_salt)
                except ValueError as e:  # the front end validates first; this is the core's own last word
                    outputs.append(EngineCoreOutput(message.request_id, [], finish_reason="error", error=str(e)))
            elif isinstance(message, AbortRequests):
                core.abort_requests(message.request_ids)
            elif isinstance(message, AbortSamples):
                core.abort_samples(message.samples)
            elif isinstance(message, UtilityCall):
                results.append((message.call_id, getattr(core, message.method)()))
        if core.has_unfinished_requests():
            outputs += core.step()
        if outputs or results or messages:
            send(EngineCoreOutputs(outputs, core.stats(), results))


OutputHandler = Callable[[EngineCoreOutputs], None]
DeathHandler = Callable[[str], None]


class ThreadCoreClient:
    """The engine loop in a daemon thread of this process."""

    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.inputs: queue.SimpleQueue[EngineCoreRequest] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_outputs: OutputHandler, on_dead: DeathHandler) -> None:
        send = lambda outputs: loop.call_soon_threadsafe(on_outputs, outputs)
        dead = lambda message: loop.call_soon_threadsafe(on_dead, message)
        self.thread = threading.Thread(target=self._run, args=(send, dead), name="pagedserve-engine", daemon=True)
        self.thread.start()

    def _run(self, send: Callable[[EngineCoreOutputs], None], dead: Callable[[str], None]) -> None:
        try:
            run_engine_loop(self.core, self._receive, send)
        except Exception as e:
            logger.exception("the engine loop died")
            dead(f"{type(e).__name__}: {e}")

    def _receive(self, block: bool) -> list[EngineCoreRequest]:
        messages = [self.inputs.get()] if block else []
        while not self.inputs.empty():
            messages.append(self.inputs.get_nowait())
        return messages

    def send(self, message: EngineCoreRequest) -> None:
        self.inputs.put(message)

    def shutdown(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.send(Shutdown())
            self.thread.join(timeout=10)


def engine_process_main(engine_args: EngineArgs, input_path: str, output_path: str) -> None:
    """Entry point of the core process: build the engine, say ready, then run the loop over ZeroMQ."""
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.connect(input_path)
    outputs = context.socket(zmq.PUSH)
    outputs.connect(output_path)
    encoder = msgspec.msgpack.Encoder()
    try:
        core = EngineCore(create_engine_config(engine_args))
    except Exception as e:
        logger.exception("engine start-up failed")
        outputs.send(encoder.encode(EngineReady(error=f"{type(e).__name__}: {e}")))
        return
    outputs.send(encoder.encode(EngineReady()))
    decoder = msgspec.msgpack.Decoder(EngineCoreRequest)

    def receive(block: bool) -> list[EngineCoreRequest]:
        messages = [decoder.decode(inputs.recv())] if block else []
        while inputs.poll(0):
            messages.append(decoder.decode(inputs.recv()))
        return messages

    try:
        run_engine_loop(core, receive, lambda out: outputs.send(encoder.encode(out)))
    finally:
        inputs.close(linger=0)
        outputs.close(linger=1000)
        context.term()


class ProcessCoreClient:
    """The engine loop in a spawned process, talking msgpack over ZeroMQ IPC sockets."""

    def __init__(self, engine: EngineProcess) -> None:
        self.engine = engine
        self.process = engine.process
        self.context = zmq.asyncio.Context()
        self.inputs = self.context.socket(zmq.PUSH)
        self.inputs.bind(engine.input_path)
        self.outputs = self.context.socket(zmq.PULL)
        self.outputs.bind(engine.output_path)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self.output_task: asyncio.Task | None = None

    async def wait_ready(self) -> None:
        while not await self.outputs.poll(1000):
            if not self.process.is_alive():
                raise RuntimeError(f"the engine process exited with code {self.process.exitcode} while starting")
        ready = msgspec.msgpack.decode(await self.outputs.recv(), type=EngineReady)
        if ready.error:
            raise RuntimeError(f"the engine process failed to start: {ready.error}")

    def start(self, loop: asyncio.AbstractEventLoop, on_outputs: OutputHandler, on_dead: DeathHandler) -> None:
        self.output_task = loop.create_task(self._pump(on_outputs, on_dead))

    async def _pump(self, on_outputs: OutputHandler, on_dead: DeathHandler) -> None:
        """Deliver outputs as they arrive; notice within a second if the engine process dies."""
        while True:
            if await self.outputs.poll(1000):
                on_outputs(self.decoder.decode(await self.outputs.recv()))
            elif not self.process.is_alive():
                on_dead(f"the engine process exited with code {self.process.exitcode}")
                return

    def send(self, message: EngineCoreRequest) -> None:
        self.inputs.send(self.encoder.encode(message), copy=False)

    def shutdown(self) -> None:
        if self.output_task is not None:
            self.output_task.cancel()
        if self.process.is_alive():
            self.send(Shutdown())
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
        self.inputs.close(linger=0)
        self.outputs.close(linger=0)
        self.context.term()
        self.engine.stop()
