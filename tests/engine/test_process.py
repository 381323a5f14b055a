"""What stays light: the engine process starts before the front end's heavy imports, the protocol module
crosses the process boundary, and the front end talks to the engine only through that module."""

import subprocess
import sys

import pytest


def test_cli_and_engine_process_do_not_import_torch():
    code = (
        "import sys\n"
        "import pagedserve, pagedserve.entrypoints.cli, pagedserve.engine.process\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from pagedserve import EngineArgs, SamplingParams\n"  # the public names still resolve
        "assert EngineArgs().block_size == 16 and SamplingParams().n == 1\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_public_names_load_on_first_use():
    import pagedserve
    from pagedserve.frontend.llm import LLM
    from pagedserve.outputs import RequestOutput

    assert pagedserve.LLM is LLM and pagedserve.RequestOutput is RequestOutput
    with pytest.raises(AttributeError, match="no attribute 'Engine'"):
        pagedserve.Engine  # noqa: B018


def imports_of(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_protocol_imports_neither_torch_nor_transformers():
    loaded = imports_of("pagedserve.engine.protocol")
    assert not loaded & {"torch", "transformers", "pagedserve.model_executor"}


def test_front_end_does_not_import_the_model_stack():
    for module in ("pagedserve.frontend.input_processor", "pagedserve.frontend.output_processor",
                   "pagedserve.frontend.async_llm"):
        loaded = imports_of(module)
        model_stack = ("pagedserve.model_executor.model", "pagedserve.model_executor.layers",
                       "pagedserve.engine.engine_core", "pagedserve.engine.scheduler")
        heavy = {m for m in loaded if m.startswith(model_stack)}
        assert not heavy, (module, heavy)


def test_a_start_up_error_waits_for_a_front_end_that_binds_late(tmp_path):
    """A model that fails at once can fail before the front end (still importing) has bound its socket: the engine
    process keeps the reason until the front end takes it, instead of exiting with it unsaid."""
    import asyncio
    import time

    from pagedserve.engine.process import start_engine_process
    from pagedserve.engine_args import EngineArgs
    from pagedserve.frontend.core_client import ProcessCoreClient

    engine = start_engine_process(EngineArgs(model=str(tmp_path / "missing")))
    try:
        time.sleep(8)  # the engine has failed by now (it used to exit a second later, its reason dropped)
        assert engine.process.is_alive(), "the engine process exited before anyone took its reason"

        async def bind_late_and_wait() -> None:
            client = ProcessCoreClient(engine)
            try:
                await client.wait_ready(60)
            finally:
                await client.shutdown()  # its sockets and context too (a context left to the GC can block it)

        with pytest.raises(RuntimeError, match="the engine failed to start: .*missing"):
            asyncio.run(bind_late_and_wait())
    finally:
        engine.stop()
