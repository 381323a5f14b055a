"""The engine's busy loop, wherever it runs: in a thread of the server (`run_engine_loop` over Python queues),
in its own process (`engine_process_main`: msgpack over ZeroMQ IPC sockets, as vLLM v1), or in the caller's
thread for the offline `LLM` (`EngineLoop.turn` called in its loop).

Each turn: take the messages that arrived, run one step if there is work, send what came out. An idle loop
waits for a message only until the next session lease is due, so a lease ends at its TTL (its blocks free, the
gauges updated) although no request follows. A message
that fails (a request the core rejects, a utility call that raises) answers with an error and the loop
goes on; a model step that fails fails only the requests that caused it (EngineCore.step). Only a bug in
the loop itself ends it, and the front end then restarts the engine.
"""

import logging
import math
import os
import time
from collections.abc import Callable

import msgspec
import zmq

from pagedserve.engine.engine_core import EngineCore
from pagedserve.engine.protocol import (
    AbortRequests,
    AddRequest,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineReady,
    Shutdown,
    StopSamples,
    UtilityCall,
    UtilityResult,
)
from pagedserve.engine_args import EngineArgs

logger = logging.getLogger("pagedserve")

UTILITY_METHODS = ("reset_prefix_cache", "stats", "close_session")
START_UP_ERROR_LINGER_MS = 60_000  # how long a failed engine process waits for the front end to take why


class EngineLoop:
    """The engine's driver, one turn at a time: apply the messages that came in, run one step if anything is
    unfinished, and return what goes out. The engine process (or thread) and the offline `LLM` run the same one."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.stopped = False  # a Shutdown came: the core is shut down

    def turn(self, messages: list[EngineCoreRequest]) -> EngineCoreOutputs | None:
        """What to send after these messages and one step; None if there is nothing to send, or on Shutdown."""
        core = self.core
        expired = core.sessions.expire()
        outputs: list[EngineCoreOutput] = []
        results: list[UtilityResult] = []
        for message in messages:
            if isinstance(message, Shutdown):
                core.shutdown()
                self.stopped = True
                return None
            if isinstance(message, AddRequest):
                try:
                    core.add_request(message)
                except Exception as e:  # the front end validates first; this is the core's own last word
                    error = str(e) if isinstance(e, ValueError) else f"engine error: {type(e).__name__}: {e}"
                    outputs.append(EngineCoreOutput(message.request_id, [], finish_reason="error", error=error))
            elif isinstance(message, AbortRequests):
                core.abort_requests(message.request_ids)
            elif isinstance(message, StopSamples):
                core.stop_samples(message.samples)
            elif isinstance(message, UtilityCall):
                results.append(_call(core, message))
        if core.has_unfinished_requests():
            outputs += core.step()
        if outputs or results or messages or expired:  # the stats of an expiry are news too
            return EngineCoreOutputs(outputs, core.stats(), results)
        return None


Receive = Callable[[float | None], list[EngineCoreRequest]]


def run_engine_loop(core: EngineCore, receive: Receive, send: Callable[[EngineCoreOutputs], None]) -> None:
    """Loop until a Shutdown message. `receive(timeout)` returns the messages that are there, waiting up to
    `timeout` seconds (None: until one comes) for the first: no wait when the engine is busy, until the next
    session wake-up (a lease's TTL) when it is idle."""
    loop = EngineLoop(core)
    while not loop.stopped:
        timeout = 0.0 if core.has_unfinished_requests() else core.sessions.seconds_to_next_wakeup()
        out = loop.turn(receive(timeout))
        if out is not None:
            send(out)


def _call(core: EngineCore, call: UtilityCall) -> UtilityResult:
    if call.method not in UTILITY_METHODS:
        return UtilityResult(call.call_id, error=f"unknown engine method {call.method!r}")
    try:
        return UtilityResult(call.call_id, getattr(core, call.method)(*call.args))
    except Exception as e:
        logger.exception("engine call %s failed", call.method)
        return UtilityResult(call.call_id, error=f"{type(e).__name__}: {e}")


def engine_process_main(engine_args: EngineArgs, input_path: str, output_path: str) -> None:
    """Entry point of the core process: build the engine, say ready (or why not), then run the loop."""
    from pagedserve.config import create_engine_config

    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.connect(input_path)
    outputs = context.socket(zmq.PUSH)
    outputs.connect(output_path)
    encoder = msgspec.msgpack.Encoder()
    linger_ms = 1000  # let the last outputs reach the front end
    try:
        try:
            core = EngineCore(create_engine_config(engine_args))
        except Exception as e:  # the front end reports it in one line; the traceback is for --log-level debug
            logger.debug("engine start-up failed", exc_info=True)
            error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            outputs.send(encoder.encode(EngineReady(error=error)))
            # A model that fails at once can fail before the front end, still importing, has bound its socket:
            # wait for it to take the reason rather than exit with it unsaid
            linger_ms = START_UP_ERROR_LINGER_MS
            return
        outputs.send(encoder.encode(EngineReady(limits=core.limits)))
        decoder = msgspec.msgpack.Decoder(EngineCoreRequest)

        parent = os.getppid()

        def receive(timeout: float | None) -> list[EngineCoreRequest]:
            """Never waits for a front end that is gone (killed, say): the engine then stops."""
            if os.getppid() != parent:
                return [Shutdown()]
            deadline = math.inf if timeout is None else time.monotonic() + timeout
            while not inputs.poll(math.ceil(1000 * max(0.0, min(1.0, deadline - time.monotonic())))):
                if time.monotonic() >= deadline:
                    break
                if os.getppid() != parent:
                    return [Shutdown()]
            messages = []
            while inputs.poll(0):
                messages.append(decoder.decode(inputs.recv()))
            return messages

        run_engine_loop(core, receive, lambda out: outputs.send(encoder.encode(out)))
    finally:
        inputs.close(linger=0)
        outputs.close(linger=linger_ms)
        context.term()
