"""The house's import rules, read from the code: what each layer may import, and what stays light."""

import ast
import subprocess
import sys
from pathlib import Path


def loaded_modules(*modules: str) -> set[str]:
    code = f"import sys, {', '.join(modules)}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_the_step_contract_and_the_scheduler_import_no_torch():
    loaded = loaded_modules("pagedserve.model_executor.step", "pagedserve.engine.scheduler")
    assert not loaded & {"torch", "transformers", "pagedserve.model_executor.model_runner"}


# Floors, lowest first: a module may import its own floor and those below, never one above. `pagedserve/__init__`
# (lazy public names) and `pagedserve/benchmarks` (a client that talks HTTP) are not floors of the engine.
FLOORS = [
    {"sampling_params", "outputs", "model_files", "engine_args", "speculative_config", "checkpoint_quantization",
     "local_ray", "native", "distributed", "gguf_file"},
    {"config", "tokenizer"},
    {"model_executor"},
    {"executor"},
    {"engine"},
    {"frontend"},
    {"entrypoints"},
]
PACKAGE = Path(__file__).resolve().parent.parent / "pagedserve"


def room(module: str) -> str:
    """The floor-level name of a pagedserve module: its top-level package or module under pagedserve."""
    return module.split(".")[1] if module.count(".") else ""


def floor_of(name: str) -> int | None:
    return next((i for i, names in enumerate(FLOORS) if name in names), None)


def imports() -> list[tuple[str, str]]:
    """(importing file's module, imported pagedserve module) for every import in the package, lazy ones too."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against the package
                base = module.split(".")[: -node.level]
                names = [".".join(base + ([node.module] if node.module else []))]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found += [(module, name) for name in names if name.startswith("pagedserve.")]
    return found


def test_no_import_runs_back_up_a_floor():
    upward = []
    for module, imported in imports():
        source, target = floor_of(room(module)), floor_of(room(imported))
        if source is not None and target is not None and target > source:
            upward.append(f"{module} -> {imported}")
    assert not upward


def test_the_engine_sees_the_model_stack_only_through_the_step_contract_and_the_executor():
    for module, imported in imports():
        if room(module) == "engine" and room(imported) == "model_executor":
            assert imported == "pagedserve.model_executor.step", (module, imported)


def test_the_front_end_never_imports_the_model_stack():
    for module, imported in imports():
        if room(module) == "frontend":
            assert room(imported) not in {"model_executor", "executor", "native", "distributed"}, (module, imported)


def test_only_the_entrypoints_import_the_entrypoints():
    for module, imported in imports():
        if room(imported) == "entrypoints":
            assert room(module) in {"entrypoints", "benchmarks", ""}, (module, imported)
