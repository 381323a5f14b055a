"""Starting the engine core's own process. Free of heavy imports: `pagedserve serve` calls
`start_engine_process` first thing, so the engine's imports and model load overlap the front end's."""

import logging
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

from pagedserve.engine_args import EngineArgs


@dataclass
class EngineProcess:
    process: BaseProcess
    input_path: str  # ZeroMQ IPC address of the requests the front end sends
    output_path: str  # ... and of the outputs it receives
    tmpdir: tempfile.TemporaryDirectory

    def stop(self) -> None:
        """Kill it (start-up of the front end failed); ProcessCoreClient.shutdown is the graceful way."""
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
        self.tmpdir.cleanup()


def start_engine_process(engine_args: EngineArgs, log_level: int = logging.INFO) -> EngineProcess:
    tmpdir = tempfile.TemporaryDirectory(prefix="pagedserve-")
    input_path = f"ipc://{os.path.join(tmpdir.name, 'input')}"
    output_path = f"ipc://{os.path.join(tmpdir.name, 'output')}"
    process = multiprocessing.get_context("spawn").Process(
        target=_main, args=(engine_args, input_path, output_path, log_level), name="pagedserve-engine", daemon=True
    )
    process.start()
    return EngineProcess(process, input_path, output_path, tmpdir)


def _main(engine_args: EngineArgs, input_path: str, output_path: str, log_level: int) -> None:
    logging.getLogger("pagedserve").setLevel(log_level)
    from pagedserve.engine.core_loop import engine_process_main

    engine_process_main(engine_args, input_path, output_path)
