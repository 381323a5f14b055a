"""The front end's handle on the engine loop: in a thread of this process, or in its own process.

Either way the front end sends messages (add, abort, a utility call) and receives one `EngineCoreOutputs`
per engine step, delivered to a callback on the asyncio loop; if the loop dies, a second callback says so. So
does an exception that escapes the output callback (a fault outside any one request: the callback fails the
requests it can pin a fault on itself): the outputs would otherwise stop while the engine looks alive.
- `ThreadCoreClient`: the loop runs in a daemon thread; messages are Python objects on a queue.
- `ProcessCoreClient`: the loop runs in a spawned process (as vLLM v1); messages are msgspec-encoded
  msgpack over ZeroMQ IPC sockets, so HTTP handling and detokenization never hold the model's GIL.
"""

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from pagedserve.config import EngineConfig
from pagedserve.engine.process import EngineProcess
from pagedserve.engine.protocol import EngineCoreOutputs, EngineCoreRequest, EngineReady, ModelLimits, Shutdown

logger = logging.getLogger("pagedserve")

OutputHandler = Callable[[EngineCoreOutputs], None]
DeathHandler = Callable[[str], None]


def deliver(handle: Callable[[], None], on_dead: DeathHandler) -> bool:
    """Run `handle` (decode one step's outputs and hand them to the output callback); False (after `on_dead`) if
    it raised: deliver no more."""
    try:
        handle()
    except Exception as e:
        logger.exception("handling the engine's outputs failed")
        on_dead(f"handling the engine's outputs failed: {type(e).__name__}: {e}")
        return False
    return True


class ThreadCoreClient:
    """The engine loop in a daemon thread of this process. Building it loads the model (call it off the
    event loop)."""

    def __init__(self, config: EngineConfig) -> None:
        from pagedserve.engine.engine_core import EngineCore  # the model stack, only for this placement

        self.core = EngineCore(config)
        self.limits: ModelLimits = self.core.limits
        self.inputs: queue.SimpleQueue[EngineCoreRequest] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.delivering = True  # until handling an output failed (the engine is then treated as dead)

    async def wait_ready(self, timeout: float) -> ModelLimits:
        return self.limits

    def start(self, loop: asyncio.AbstractEventLoop, on_outputs: OutputHandler, on_dead: DeathHandler) -> None:
        def on_loop(outputs: EngineCoreOutputs) -> None:
            if self.delivering:
                self.delivering = deliver(lambda: on_outputs(outputs), on_dead)

        send = lambda outputs: loop.call_soon_threadsafe(on_loop, outputs)
        dead = lambda message: loop.call_soon_threadsafe(on_dead, message)
        self.thread = threading.Thread(target=self._run, args=(send, dead), name="pagedserve-engine", daemon=True)
        self.thread.start()

    def _run(self, send: Callable[[EngineCoreOutputs], None], dead: Callable[[str], None]) -> None:
        from pagedserve.engine.core_loop import run_engine_loop

        try:
            run_engine_loop(self.core, self._receive, send)
        except Exception as e:
            logger.exception("the engine loop died")
            dead(f"the engine loop died: {type(e).__name__}: {e}")

    def _receive(self, timeout: float | None) -> list[EngineCoreRequest]:
        messages = []
        if timeout is None or timeout > 0:
            try:
                messages.append(self.inputs.get(timeout=timeout))
            except queue.Empty:
                return messages
        while not self.inputs.empty():
            messages.append(self.inputs.get_nowait())
        return messages

    def send(self, message: EngineCoreRequest) -> None:
        self.inputs.put(message)

    async def shutdown(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.send(Shutdown())
            await asyncio.to_thread(self.thread.join, 10)


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

    async def wait_ready(self, timeout: float) -> ModelLimits:
        """Wait for the engine to load its model; RuntimeError if it fails, exits or takes over `timeout` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.outputs.poll(200):
            if not self.process.is_alive():
                if await self.outputs.poll(1000):  # it said why before it exited (EngineReady with the error)
                    break
                raise RuntimeError(f"the engine process exited with code {self.process.exitcode} while starting")
            if loop.time() > deadline:
                raise RuntimeError(f"the engine process was not ready after {timeout:.0f} s")
        ready = msgspec.msgpack.decode(await self.outputs.recv(), type=EngineReady)
        if ready.error or ready.limits is None:
            raise RuntimeError(f"the engine failed to start: {ready.error}")
        return ready.limits

    def start(self, loop: asyncio.AbstractEventLoop, on_outputs: OutputHandler, on_dead: DeathHandler) -> None:
        self.output_task = loop.create_task(self._pump(on_outputs, on_dead))

    async def _pump(self, on_outputs: OutputHandler, on_dead: DeathHandler) -> None:
        """Deliver outputs as they arrive; notice within half a second if the engine process dies."""
        while True:
            if await self.outputs.poll(500):
                frame = await self.outputs.recv()
                if not deliver(functools.partial(self._handle, on_outputs, frame), on_dead):
                    return
            elif not self.process.is_alive():
                on_dead(f"the engine process exited with code {self.process.exitcode}")
                return

    def _handle(self, on_outputs: OutputHandler, frame: bytes) -> None:
        on_outputs(self.decoder.decode(frame))

    def send(self, message: EngineCoreRequest) -> None:
        self.inputs.send(self.encoder.encode(message), copy=False)

    async def shutdown(self) -> None:
        """Stop the pump first, then the process (asked, then killed), then the sockets: nothing is left
        waiting on a closed socket."""
        if self.output_task is not None:
            self.output_task.cancel()
            await asyncio.gather(self.output_task, return_exceptions=True)
        if self.process.is_alive():
            self.send(Shutdown())
            await asyncio.to_thread(self.process.join, 10)
        self.inputs.close(linger=0)
        self.outputs.close(linger=0)
        self.context.term()
        self.engine.stop()
