"""Loading models from GGUF files: config, dequantized weights with Hugging Face names, tokenizer.

The header is parsed here rather than with `gguf.GGUFReader`, which takes seconds on a small model because
it walks the tokenizer's 50k-entry string arrays field by field. Only the tokenizer needs those arrays, and
it is built once by transformers and then cached on disk. Tensor data is memory-mapped and dequantized
with vectorised torch ops, one whole tensor at a time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType

from pagedserve.model_files import GGUF_MAGIC, is_gguf_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

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


def _map_file(path: str) -> np.ndarray:
    # Copy-on-write so torch.from_numpy gets a writable array (no warning); nothing is ever written.
    return np.memmap(path, dtype=np.uint8, mode="c")


def read_gguf_header(path: str, keep_strings: bool = False) -> GGUFHeader:
    """Parse metadata and the tensor table. String arrays are skipped unless `keep_strings`."""
    if not is_gguf_file(path):
        raise ValueError(f"{path} is not a GGUF file (missing file or no {GGUF_MAGIC!r} magic)")
    data = _map_file(path)
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


def _header(path: str) -> GGUFHeader:
    """`read_gguf_header`, memoised per (path, size, mtime) so config and tensor loading parse it once."""
    if not is_gguf_file(path):
        raise ValueError(f"{path} is not a GGUF file (missing file or no {GGUF_MAGIC!r} magic)")
    st = os.stat(path)
    return _cached_header(os.path.abspath(path), st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------------------------------------
# Dequantization: each function maps uint8 blocks [n_blocks, type_size] to float32 [n_blocks, block_size].
# The arithmetic follows gguf.quants (float32, same operation order) so results are bit-identical.
# ----------------------------------------------------------------------------------------------------------

_CRUMB_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block, as float32 [n_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k] values: for each `group` bytes, their low nibbles, then their high nibbles.

    The masks and shifts run on int32 words (four bytes at once), which is several times faster than
    byte-wise ops on the strided block slices.
    """
    n = qs.shape[0]
    words = qs.contiguous().view(torch.int32).reshape(n, -1, 1, group // 4)
    return torch.cat([words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F], dim=2).view(torch.uint8).reshape(n, -1)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 8k] bits, least significant bit first."""
    return ((qh.unsqueeze(-1) >> _BIT_SHIFTS) & 1).flatten(-2)


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:], 16).to(torch.int8) - 8
    return q.float().mul_(_f16(blocks, 0))


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 4:], 16)
    return q.float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(blocks[:, 6:], 16) | (_bits(blocks[:, 2:6]) << 4)).to(torch.int8) - 16
    return q.float().mul_(_f16(blocks, 0))


def _dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 8:], 16) | (_bits(blocks[:, 4:8]) << 4)
    return q.float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).float().mul_(_f16(blocks, 0))


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte, 6-bit scale/min table of Q4_K and Q5_K into two [n, 8] tensors."""
    d, m, md = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_affine(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`d * scale * q - dmin * min` over 8 sub-blocks of 32, for Q4_K / Q5_K."""
    sc, mn = _k_scales(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float()).unsqueeze(-1)
    dm = (_f16(blocks, 2) * mn.float()).unsqueeze(-1)
    return (q.float().mul_(d).sub_(dm)).flatten(1)


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # each 32-byte chunk holds two sub-blocks of 32: low nibbles, then high nibbles
    return _k_affine(blocks, _nibbles(blocks[:, 16:], 32).reshape(-1, 8, 32))


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    ql = _nibbles(blocks[:, 48:], 32).reshape(-1, 8, 32)
    qh = ((blocks[:, 16:48].reshape(-1, 1, 32) >> _BIT_SHIFTS.view(1, 8, 1)) & 1).reshape(-1, 8, 32)
    return _k_affine(blocks, ql | (qh << 4))


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].view(torch.int8).float()
    d = (_f16(blocks, 208) * scales).reshape(n, 16, 1)
    ql = _nibbles(blocks[:, :128], 64).reshape(n, 8, 32)
    qh = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> _CRUMB_SHIFTS.view(1, 1, 4, 1)) & 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    return q.float().mul_(d).reshape(n, 256)


class _BlockFormat(NamedTuple):
    block_size: int  # elements per block
    type_size: int  # bytes per block
    dequant: Callable[[torch.Tensor], torch.Tensor]


_T = GGMLQuantizationType
_BLOCK_FORMATS: dict[int, _BlockFormat] = {
    _T.Q4_0: _BlockFormat(32, 18, _dequant_q4_0),
    _T.Q4_1: _BlockFormat(32, 20, _dequant_q4_1),
    _T.Q5_0: _BlockFormat(32, 22, _dequant_q5_0),
    _T.Q5_1: _BlockFormat(32, 24, _dequant_q5_1),
    _T.Q8_0: _BlockFormat(32, 34, _dequant_q8_0),
    _T.Q4_K: _BlockFormat(256, 144, _dequant_q4_k),
    _T.Q5_K: _BlockFormat(256, 176, _dequant_q5_k),
    _T.Q6_K: _BlockFormat(256, 210, _dequant_q6_k),
}
_FLOAT_FORMATS: dict[int, torch.dtype] = {
    _T.F32: torch.float32,
    _T.F16: torch.float16,
    _T.BF16: torch.bfloat16,
}
SUPPORTED_TENSOR_TYPES = tuple(_T(t).name for t in (*_FLOAT_FORMATS, *_BLOCK_FORMATS))


def _type_name(ggml_type: int) -> str:
    try:
        return _T(ggml_type).name
    except ValueError:
        return f"<unknown ggml type {ggml_type}>"


def block_format(ggml_type: int) -> tuple[int, int]:
    """(weights per block, bytes per block) of a block-quantized type."""
    fmt = _BLOCK_FORMATS[ggml_type]
    return fmt.block_size, fmt.type_size


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int | None:
    """Bytes a tensor occupies, or None for a type this loader cannot read (an error once it is loaded)."""
    numel = int(np.prod(shape, dtype=np.int64))
    if ggml_type in _FLOAT_FORMATS:
        return numel * _FLOAT_FORMATS[ggml_type].itemsize
    if ggml_type in _BLOCK_FORMATS:
        fmt = _BLOCK_FORMATS[ggml_type]
        return numel // fmt.block_size * fmt.type_size
    return None


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize a tensor's raw uint8 bytes to a float32 tensor of `shape` (torch order)."""
    if ggml_type in _FLOAT_FORMATS:
        values = raw.view(_FLOAT_FORMATS[ggml_type])
        return (values.clone() if values.dtype == torch.float32 else values.float()).reshape(shape)
    if ggml_type not in _BLOCK_FORMATS:
        supported = ", ".join(SUPPORTED_TENSOR_TYPES)
        raise ValueError(f"unsupported GGUF tensor type {_type_name(ggml_type)}; supported: {supported}")
    fmt = _BLOCK_FORMATS[ggml_type]
    if shape and shape[-1] % fmt.block_size:
        name = _type_name(ggml_type)
        raise ValueError(f"row length {shape[-1]} is not a multiple of {name}'s block size {fmt.block_size}")
    return fmt.dequant(raw.view(-1, fmt.type_size)).reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------

_ARCHITECTURES = {  # GGUF general.architecture -> (transformers config class, HF architecture name)
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def _check_architecture(arch: str, path: str) -> None:
    if arch not in _ARCHITECTURES:
        moe = " (mixture-of-experts GGUF files are not supported: load the safetensors checkpoint)"
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}{moe if 'moe' in arch else ''}; "
            f"supported: {', '.join(sorted(_ARCHITECTURES))}"
        )


def load_gguf_config(path: str) -> PretrainedConfig:
    """A Hugging Face config (LlamaConfig / Qwen2Config / Qwen3Config) built from the file's metadata."""
    import transformers

    header = _header(path)
    md, arch = header.metadata, header.architecture
    _check_architecture(arch, path)

    def get(key: str, default: Any = _REQUIRED) -> Any:
        return _metadata(header, f"{arch}.{key}", default)

    if int(get("expert_count", 0)):
        raise ValueError(f"{path}: mixture-of-experts GGUF files are not supported ({arch}.expert_count="
                         f"{get('expert_count')}); load the Hugging Face safetensors checkpoint")

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size", None)
    if vocab is None:  # older files: the vocabulary length is the array length
        tokens = _metadata(header, "tokenizer.ggml.tokens")
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


def _metadata(header: GGUFHeader, key: str, default: Any = _REQUIRED) -> Any:
    """A metadata value; a missing required key is a ValueError naming it."""
    value = header.metadata.get(key, default)
    if value is _REQUIRED:
        raise ValueError(f"{header.path}: GGUF metadata lacks {key!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Rope frequency factors (llama3 / long-context phi3 files) are buffers, not parameters. transformers skips
# them too, so llama3-style rope scaling is not reconstructed from them.
_IGNORED_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face parameter name for a GGUF tensor name; None for tensors that are not parameters."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name in _IGNORED_TENSORS:
        return None
    prefix, _, rest = name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"
    raise ValueError(f"unexpected GGUF tensor {name!r}")


def _unpermute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (its rope pairs adjacent dims; HF rotates halves).

    Same as transformers' `_reverse_permute_weights`. It only reorders output rows, so it is applied to the
    quantized bytes (whole rows of blocks) before dequantization.
    """
    shape = rows.shape
    return rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


class QuantizedTensor(NamedTuple):
    """A 2-D weight kept in its file's block format: uint8 [rows, bytes per row] (whole rows of blocks)."""

    blocks: torch.Tensor
    ggml_type: int


def tensor_types(path: str) -> dict[str, int]:
    """The ggml type of each parameter of the file, by Hugging Face name."""
    types = {}
    for info in _header(path).tensors:
        hf_name = gguf_to_hf_name(info.name)
        if hf_name is not None:
            types[hf_name] = info.ggml_type
    return types


def iter_gguf_tensors(
    path: str, dtype: torch.dtype, keep_quantized: Collection[str] = ()
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Yield `(hf_name, tensor)` for every parameter, dequantized to `dtype`, in file order; the names in
    `keep_quantized` (block-quantized 2-D weights) come as `QuantizedTensor`s of the file's bytes instead.

    `lm_head.weight` is yielded only when the file has its own output matrix; otherwise the config has
    `tie_word_embeddings=True` and the head shares `model.embed_tokens.weight`. The file is validated
    (architecture, tensor names and types) before the first tensor is read, so errors surface here.
    """
    header = _header(path)
    arch = header.architecture
    _check_architecture(arch, path)
    # llama.cpp permutes q/k rows for llama only (its qwen converters leave them alone)
    permuted_heads = {}
    if arch == "llama":
        n_heads = int(_metadata(header, "llama.attention.head_count"))
        n_kv_heads = int(_metadata(header, "llama.attention.head_count_kv", n_heads))
        permuted_heads = {"attn_q.weight": n_heads, "attn_k.weight": n_kv_heads}

    plan = []
    for info in header.tensors:
        hf_name = gguf_to_hf_name(info.name)
        if hf_name is None:
            continue
        if info.ggml_type not in _FLOAT_FORMATS and info.ggml_type not in _BLOCK_FORMATS:
            raise ValueError(
                f"{path}: tensor {info.name} has unsupported type {_type_name(info.ggml_type)}; "
                f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
        layer_suffix = info.name.split(".", 2)[-1]  # "blk.3.attn_q.weight" -> "attn_q.weight"
        if hf_name in keep_quantized and (info.ggml_type not in _BLOCK_FORMATS or len(info.shape) != 2):
            raise ValueError(f"{path}: tensor {info.name} ({_type_name(info.ggml_type)}) is not a block-quantized "
                             "matrix")
        plan.append((hf_name, info, permuted_heads.get(layer_suffix, 0)))
    return _load_tensors(path, plan, dtype, keep_quantized)


def _load_tensors(
    path: str, plan: list[tuple[str, GGUFTensorInfo, int]], dtype: torch.dtype, keep_quantized: Collection[str]
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    data = torch.from_numpy(_map_file(path))
    for hf_name, info, permuted_heads in plan:
        with _single_threaded():
            raw = data[info.offset : info.offset + info.nbytes]
            if permuted_heads:
                raw = _unpermute_rows(raw.view(info.shape[0], -1), permuted_heads).reshape(-1)
            if hf_name in keep_quantized:
                tensor: torch.Tensor | QuantizedTensor = QuantizedTensor(raw.view(info.shape[0], -1), info.ggml_type)
            else:
                tensor = dequantize(raw, info.ggml_type, info.shape).to(dtype)
        yield hf_name, tensor


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch ops on one intra-op thread, restoring the previous setting after.

    Dequantization is a chain of short memory-bound ops. With two OpenMP threads on a shared 2-core machine,
    every op waits for the slower thread to get a time slice: loading SmolLM2 took 28 s instead of 1.2 s
    under load, while one thread is about as fast as two on an idle machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


def _cache_root() -> str:
    root = os.environ.get("PAGEDSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pagedserve")
    return os.path.join(root, "gguf")


def tokenizer_cache_dir(path: str) -> str:
    """The tokenizer cache folder for `path`, keyed by absolute path, size, mtime and transformers version."""
    import transformers

    path = os.path.abspath(path)
    st = os.stat(path)
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(_cache_root(), f"{stem}-{digest}")


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """The file's tokenizer (chat template, bos/eos included), built by transformers once, then cached."""
    from transformers import PreTrainedTokenizerFast

    header = _header(path)  # validates the file; cheap after the first call
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
