"""A tensor-parallel worker's process (`distributed_executor_backend="mp"`): `python -m
pagedserve.executor.worker_process FD LOG_LEVEL`, FD its end of the socket pair rank 0 drives it over.

It receives (config, rank, init method, backend), builds its `Worker`, replies None (or the error), then runs the
calls it receives in order, replying to each with None or the error's text; "close" ends it, and so does the
engine's process going away.
"""

import logging
import os
import sys
from multiprocessing.connection import Connection

from pagedserve.executor.tensor_parallel import Worker


def main(fd: int, log_level: int) -> None:
    logging.basicConfig(format="%(levelname)s %(asctime)s %(name)s: %(message)s", datefmt="%m-%d %H:%M:%S")
    logging.getLogger("pagedserve").setLevel(log_level)
    conn = Connection(fd)
    parent = os.getppid()
    try:
        worker = Worker(*conn.recv())
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send(None)
    try:
        while True:
            while not conn.poll(1.0):
                if os.getppid() != parent:  # the engine is gone
                    return
            method, args = conn.recv()
            if method == "close":
                return
            try:
                getattr(worker, method)(*args)
                conn.send(None)
            except Exception as e:
                conn.send(f"{type(e).__name__}: {e}")
    except (EOFError, OSError):  # the engine closed the connection
        return
    finally:
        worker.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
