"""Loading GGUF tokenizers: equal to transformers' own, and cached on disk."""

import os
import time

import pytest

from pagedserve import gguf_file
from pagedserve import tokenizer as tk
from pagedserve.model_files import default_model_path

DEFAULT = default_model_path()

pytestmark = pytest.mark.usefixtures("isolated_gguf_cache")

_TEXTS = ["Hello world! How are you?", "  leading spaces\tand\ttabs\n\nnew lines", "naïve café — 東京 🤖", ""]


def test_tokenizer_matches_transformers(hf_tokenizer) -> None:
    tok = tk.load_gguf_tokenizer(DEFAULT)
    for text in _TEXTS:
        assert tok(text)["input_ids"] == hf_tokenizer(text)["input_ids"], text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.chat_template == hf_tokenizer.chat_template
    assert tok.chat_template == gguf_file.read_gguf_header(DEFAULT).metadata["tokenizer.chat_template"]
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )


def test_tokenizer_cache(tmp_path: "os.PathLike[str]", monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.integrations.gguf as transformers_gguf

    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    cache = tk.tokenizer_cache_dir(DEFAULT)
    assert cache.startswith(os.path.join(str(tmp_path), "gguf"))
    first = tk.load_gguf_tokenizer(DEFAULT)
    assert os.path.isfile(os.path.join(cache, "tokenizer.json"))

    with monkeypatch.context() as patch:
        patch.setattr(transformers_gguf, "get_gguf_tokenizer", lambda *a, **k: pytest.fail("GGUF re-read"))
        start = time.perf_counter()
        second = tk.load_gguf_tokenizer(DEFAULT)
        assert time.perf_counter() - start < 10.0  # ~0.3 s idle; loose for shared CI machines
    assert os.path.samefile(second.name_or_path, cache)
    for text in _TEXTS:
        assert second(text)["input_ids"] == first(text)["input_ids"]
    assert second.chat_template == first.chat_template
    assert (second.bos_token, second.eos_token) == (first.bos_token, first.eos_token)
    assert second.pad_token == first.pad_token == "<|im_end|>"

    # a corrupt cache is rebuilt rather than fatal
    with open(os.path.join(cache, "tokenizer.json"), "w") as f:
        f.write('{"not": "a tokenizer"}')
    third = tk.load_gguf_tokenizer(DEFAULT)
    assert third("Hello world!")["input_ids"] == first("Hello world!")["input_ids"]


def test_tokenizer_cache_key_changes_with_file(tmp_path: "os.PathLike[str]") -> None:
    copy = os.path.join(tmp_path, "model.gguf")
    with open(copy, "wb") as f:
        f.write(b"GGUF" + bytes(60))
    key = tk.tokenizer_cache_dir(copy)
    os.utime(copy, ns=(0, 123_000_000_000))
    assert tk.tokenizer_cache_dir(copy) != key
    assert tk.tokenizer_cache_dir(copy) != tk.tokenizer_cache_dir(DEFAULT)
