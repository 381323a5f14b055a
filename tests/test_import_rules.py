"""The house's import rules, read from the code: what each layer may import, and what stays light."""

import subprocess
import sys


def loaded_modules(*modules: str) -> set[str]:
    code = f"import sys, {', '.join(modules)}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_the_step_contract_and_the_scheduler_import_no_torch():
    loaded = loaded_modules("pagedserve.model_executor.step", "pagedserve.engine.scheduler")
    assert not loaded & {"torch", "transformers", "pagedserve.model_executor.model_runner"}
