"""Loading a model's tokenizer: from the `tokenizer` path given, the model's directory, or its GGUF file.

A GGUF file's tokenizer is built by transformers from the file's metadata once (seconds: it walks the
vocabulary's string arrays), then saved as a tokenizer directory in an on-disk cache and loaded from there.
"""

import hashlib
import os
import shutil
import tempfile

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pagedserve.config import EngineConfig
from pagedserve.gguf_file import cached_header


def load_tokenizer(config: EngineConfig) -> PreTrainedTokenizerBase:
    if config.tokenizer_path:
        return AutoTokenizer.from_pretrained(config.tokenizer_path, local_files_only=True)
    if config.gguf_path:
        return load_gguf_tokenizer(config.gguf_path)
    return AutoTokenizer.from_pretrained(config.model_path, local_files_only=True)


def _cache_root() -> str:
    root = os.environ.get("PAGEDSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pagedserve")
    return os.path.join(root, "gguf")


def tokenizer_cache_dir(path: str) -> str:
    """The tokenizer cache folder for `path`, keyed by absolute path, size, mtime and transformers version."""
    path = os.path.abspath(path)
    st = os.stat(path)
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(_cache_root(), f"{stem}-{digest}")


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """The file's tokenizer (chat template, bos/eos included), built by transformers once, then cached."""
    header = cached_header(path)  # validates the file; cheap after the first call
    cache = tokenizer_cache_dir(path)
    if os.path.isfile(os.path.join(cache, "tokenizer.json")):
        try:
            return PreTrainedTokenizerFast.from_pretrained(cache, local_files_only=True)
        except Exception:  # tokenizers raises plain Exception on a malformed tokenizer.json
            pass
    shutil.rmtree(cache, ignore_errors=True)  # missing or unreadable: rebuild it

    if "tokenizer.ggml.model" not in header.metadata:
        raise ValueError(f"{path}: GGUF file has no tokenizer metadata")
    directory, name = os.path.split(os.path.abspath(path))
    # Straight to the fast tokenizer class: AutoTokenizer would first build a config through gguf.GGUFReader.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, gguf_file=name, local_files_only=True)
    _save_atomically(tokenizer, cache)
    return tokenizer


def _save_atomically(tokenizer: PreTrainedTokenizerFast, cache: str) -> None:
    """Write to a temporary dir and rename, so concurrent loaders never see a half-written cache."""
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(cache))
    except OSError:
        return  # read-only cache location: just don't cache
    try:
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)
    except OSError:
        pass  # another process won the race (or the disk is full); the tokenizer is still usable
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
