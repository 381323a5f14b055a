"""The part of a request's output stream that ends the request when the stream is left unfinished.

A generator's `finally` is not enough for that: a stream that is never iterated (its client went away before the
first output) has no frame to run it, and the request would run to `max_tokens` with its bookkeeping kept. The
stream owns one of these and calls `close` when it ends or is closed; if the stream is dropped first, the
finalizer aborts the request on the event loop.
"""

import asyncio
from collections.abc import Callable


class AbortOnDrop:
    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        """`abort(request_id)`: forget the request, and stop it in the engine if it still runs (idempotent)."""
        self.request_id = request_id
        self.abort = abort
        self.loop = asyncio.get_running_loop()
        self.closed = False

    def close(self) -> None:
        """The stream ended (its request finished or failed) or its consumer left it: forget the request now."""
        if not self.closed:
            self.closed = True
            self.abort(self.request_id)

    def __del__(self) -> None:
        if self.closed:
            return
        try:  # a finalizer may run in any thread, at any point: the abort runs on the loop
            self.loop.call_soon_threadsafe(self.abort, self.request_id)
        except RuntimeError:  # the loop is closed: nothing runs any more
            pass
