"""The engine process starts before the front end's heavy imports: the modules on that path stay light."""

import subprocess
import sys

import pytest


def test_cli_and_engine_process_do_not_import_torch():
    code = (
        "import sys\n"
        "import pagedserve, pagedserve.entrypoints.cli, pagedserve.frontend.engine_process\n"
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
