"""Reading a GGUF file's header: metadata, the tensor table, and the Hugging Face config the metadata describes.

The header is parsed here rather than with `gguf.GGUFReader`, which takes seconds on a small model because
it walks the tokenizer's 50k-entry string arrays field by field. Only the tokenizer needs those arrays, and
it is built once by transformers and then cached on disk (`tokenizer.py`). The tensors are read and dequantized
in `model_executor/gguf_weights.py`; this module needs numpy, not torch.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType

from pagedserve.model_files import GGUF_MAGIC, is_gguf_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is long gone
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value type -> struct format of the fixed-size scalars (u8 i8 u16 i16 u32 i32 f32 bool ...);
# arrays of them are read in bulk with the matching numpy dtype.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALAR_FORMATS |= {10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {k: np.dtype(v) for k, v in _SCALAR_FORMATS.items()}
_STRING, _ARRAY = 8, 9


# ----------------------------------------------------------------------------------------------------------
# Header parsing
# ----------------------------------------------------------------------------------------------------------


class UnreadStrings(NamedTuple):
    """Placeholder for a string array that was skipped rather than decoded (the tokenizer vocabulary)."""

    length: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF lists dimensions fastest-varying first
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


class _Cursor:
    """Sequential little-endian reader over a buffer."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            values = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ValueError(f"{self.path}: GGUF header is truncated or corrupt") from None
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError(f"{self.path}: GGUF header is truncated or corrupt")
        value = bytes(self.buf[self.pos : end]).decode("utf-8", errors="replace")
        self.pos = end
        return value

    def skip_strings(self, count: int) -> None:
        unpack_from, buf, pos = struct.unpack_from, self.buf, self.pos
        try:
            for _ in range(count):
                pos += 8 + unpack_from("<Q", buf, pos)[0]
        except struct.error:
            raise ValueError(f"{self.path}: GGUF header is truncated or corrupt") from None
        self.pos = pos

    def value(self, vtype: int, keep_strings: bool) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF metadata value type {vtype}")
        etype, count = self.unpack("<IQ")
        if etype in _ARRAY_DTYPES:  # numeric: one bulk read
            dtype = _ARRAY_DTYPES[etype]
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise ValueError(f"{self.path}: GGUF header is truncated or corrupt")
            array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos = end
            return array
        if etype == _STRING and not keep_strings:
            self.skip_strings(count)
            return UnreadStrings(count)
        return [self.value(etype, keep_strings) for _ in range(count)]


def map_file(path: str) -> np.ndarray:
    """The whole file, memory-mapped."""
    # Copy-on-write so torch.from_numpy gets a writable array (no warning); nothing is ever written.
    return np.memmap(path, dtype=np.uint8, mode="c")


def read_gguf_header(path: str, keep_strings: bool = False) -> GGUFHeader:
    """Parse metadata and the tensor table. String arrays are skipped unless `keep_strings`."""
    if not is_gguf_file(path):
        raise ValueError(f"{path} is not a GGUF file (missing file or no {GGUF_MAGIC!r} magic)")
    data = map_file(path)
    cur = _Cursor(data.data, path)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: unsupported GGUF version {version} (supported: {_SUPPORTED_VERSIONS})")
    n_tensors, n_kv = cur.unpack("<QQ")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"), keep_strings)

    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        dims = cur.unpack(f"<{n_dims}Q") if n_dims else ()
        dims = (dims,) if isinstance(dims, int) else dims
        ggml_type, offset = cur.unpack("<IQ")
        raw_infos.append((name, tuple(reversed(dims)), ggml_type, offset))

    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, shape, ggml_type, offset in raw_infos:
        nbytes = _tensor_nbytes(shape, ggml_type)
        start = data_start + offset
        if nbytes is not None and start + nbytes > len(data):
            raise ValueError(f"{path}: tensor {name} extends past the end of the file (truncated?)")
        tensors.append(GGUFTensorInfo(name, shape, ggml_type, start, nbytes or 0))
    if "general.architecture" not in metadata:
        raise ValueError(f"{path}: GGUF metadata has no general.architecture")
    return GGUFHeader(path, version, metadata, tuple(tensors))


@functools.lru_cache(maxsize=8)
def _cached_header(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    return read_gguf_header(path)


def cached_header(path: str) -> GGUFHeader:
    """`read_gguf_header`, memoised per (path, size, mtime) so config, tensor and tokenizer loading parse it once."""
    if not is_gguf_file(path):
        raise ValueError(f"{path} is not a GGUF file (missing file or no {GGUF_MAGIC!r} magic)")
    st = os.stat(path)
    return _cached_header(os.path.abspath(path), st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------------------------------------
# Tensor types this package reads: their layout in the file (the dequantization is model_executor/gguf_weights.py)
# ----------------------------------------------------------------------------------------------------------

_T = GGMLQuantizationType
_FLOAT_TYPES: dict[int, int] = {_T.F32: 4, _T.F16: 2, _T.BF16: 2}  # bytes per value
_BLOCK_TYPES: dict[int, tuple[int, int]] = {  # (weights per block, bytes per block)
    _T.Q4_0: (32, 18),
    _T.Q4_1: (32, 20),
    _T.Q5_0: (32, 22),
    _T.Q5_1: (32, 24),
    _T.Q8_0: (32, 34),
    _T.Q4_K: (256, 144),
    _T.Q5_K: (256, 176),
    _T.Q6_K: (256, 210),
}
SUPPORTED_TENSOR_TYPES = tuple(_T(t).name for t in (*_FLOAT_TYPES, *_BLOCK_TYPES))


def type_name(ggml_type: int) -> str:
    try:
        return _T(ggml_type).name
    except ValueError:
        return f"<unknown ggml type {ggml_type}>"


def is_float_type(ggml_type: int) -> bool:
    return ggml_type in _FLOAT_TYPES


def is_block_type(ggml_type: int) -> bool:
    """A block-quantized type this package reads."""
    return ggml_type in _BLOCK_TYPES


def block_format(ggml_type: int) -> tuple[int, int]:
    """(weights per block, bytes per block) of a block-quantized type."""
    return _BLOCK_TYPES[ggml_type]


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int | None:
    """Bytes a tensor occupies, or None for a type this package cannot read (an error once it is loaded)."""
    numel = int(np.prod(shape, dtype=np.int64))
    if ggml_type in _FLOAT_TYPES:
        return numel * _FLOAT_TYPES[ggml_type]
    if ggml_type in _BLOCK_TYPES:
        block_size, type_size = _BLOCK_TYPES[ggml_type]
        return numel // block_size * type_size
    return None


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------

_ARCHITECTURES = {  # GGUF general.architecture -> (transformers config class, HF architecture name)
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def check_architecture(arch: str, path: str) -> None:
    if arch not in _ARCHITECTURES:
        moe = " (mixture-of-experts GGUF files are not supported: load the safetensors checkpoint)"
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}{moe if 'moe' in arch else ''}; "
            f"supported: {', '.join(sorted(_ARCHITECTURES))}"
        )


def load_gguf_config(path: str) -> PretrainedConfig:
    """A Hugging Face config (LlamaConfig / Qwen2Config / Qwen3Config) built from the file's metadata."""
    import transformers

    header = cached_header(path)
    md, arch = header.metadata, header.architecture
    check_architecture(arch, path)

    def get(key: str, default: Any = _REQUIRED) -> Any:
        return metadata_value(header, f"{arch}.{key}", default)

    if int(get("expert_count", 0)):
        raise ValueError(f"{path}: mixture-of-experts GGUF files are not supported ({arch}.expert_count="
                         f"{get('expert_count')}); load the Hugging Face safetensors checkpoint")

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size", None)
    if vocab is None:  # older files: the vocabulary length is the array length
        tokens = metadata_value(header, "tokenizer.ggml.tokens")
        vocab = tokens.length if isinstance(tokens, UnreadStrings) else len(tokens)
    # attention.key_length is the head size when it differs from hidden/heads (qwen3); llama's
    # rope.dimension_count is the rotary width, which transformers also takes as head_dim for llama.
    head_dim = get("attention.key_length", None)
    if head_dim is None and arch == "llama":
        head_dim = get("rope.dimension_count", None)
    if head_dim is None:
        head_dim = hidden // n_heads
    names = {t.name for t in header.tensors}

    config_cls_name, hf_arch = _ARCHITECTURES[arch]
    config_cls = getattr(transformers, config_cls_name)
    return config_cls(
        architectures=[hf_arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(head_dim),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 2048)),
        rope_parameters=_rope_parameters(get),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_optional_int(md.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_optional_int(md.get("tokenizer.ggml.eos_token_id")),
        pad_token_id=_optional_int(md.get("tokenizer.ggml.padding_token_id")),
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _rope_parameters(get: Callable[..., Any]) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    scaling = get("rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=float(get("rope.scaling.factor")))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    elif scaling != "none":
        raise ValueError(f"unsupported rope scaling type {scaling!r} (supported: none, linear, yarn)")
    return rope


_REQUIRED = object()


def metadata_value(header: GGUFHeader, key: str, default: Any = _REQUIRED) -> Any:
    """A metadata value; a missing required key is a ValueError naming it."""
    value = header.metadata.get(key, default)
    if value is _REQUIRED:
        raise ValueError(f"{header.path}: GGUF metadata lacks {key!r}")
    return value
