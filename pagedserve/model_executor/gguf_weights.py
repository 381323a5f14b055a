"""A GGUF file's tensors as Hugging Face parameters: names mapped, llama's q/k rows unpermuted, blocks dequantized
(or kept as stored, for the GGUF linear layers).

Tensor data is memory-mapped and dequantized with vectorised torch ops, one whole tensor at a time. The header
(tensor table, metadata) is read by `pagedserve/gguf_file.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from typing import NamedTuple

import torch
from gguf import GGMLQuantizationType

from pagedserve.gguf_file import (
    SUPPORTED_TENSOR_TYPES,
    GGUFTensorInfo,
    block_format,
    cached_header,
    check_architecture,
    is_block_type,
    is_float_type,
    map_file,
    metadata_value,
    type_name,
)

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


_T = GGMLQuantizationType
_FLOAT_DTYPES: dict[int, torch.dtype] = {_T.F32: torch.float32, _T.F16: torch.float16, _T.BF16: torch.bfloat16}
_DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {  # every block type of gguf_file
    _T.Q4_0: _dequant_q4_0,
    _T.Q4_1: _dequant_q4_1,
    _T.Q5_0: _dequant_q5_0,
    _T.Q5_1: _dequant_q5_1,
    _T.Q8_0: _dequant_q8_0,
    _T.Q4_K: _dequant_q4_k,
    _T.Q5_K: _dequant_q5_k,
    _T.Q6_K: _dequant_q6_k,
}


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize a tensor's raw uint8 bytes to a float32 tensor of `shape` (torch order)."""
    if ggml_type in _FLOAT_DTYPES:
        values = raw.view(_FLOAT_DTYPES[ggml_type])
        return (values.clone() if values.dtype == torch.float32 else values.float()).reshape(shape)
    if ggml_type not in _DEQUANTIZERS:
        supported = ", ".join(SUPPORTED_TENSOR_TYPES)
        raise ValueError(f"unsupported GGUF tensor type {type_name(ggml_type)}; supported: {supported}")
    block_size, type_size = block_format(ggml_type)
    if shape and shape[-1] % block_size:
        name = type_name(ggml_type)
        raise ValueError(f"row length {shape[-1]} is not a multiple of {name}'s block size {block_size}")
    return _DEQUANTIZERS[ggml_type](raw.view(-1, type_size)).reshape(shape)


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
    for info in cached_header(path).tensors:
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
    header = cached_header(path)
    arch = header.architecture
    check_architecture(arch, path)
    # llama.cpp permutes q/k rows for llama only (its qwen converters leave them alone)
    permuted_heads = {}
    if arch == "llama":
        n_heads = int(metadata_value(header, "llama.attention.head_count"))
        n_kv_heads = int(metadata_value(header, "llama.attention.head_count_kv", n_heads))
        permuted_heads = {"attn_q.weight": n_heads, "attn_k.weight": n_kv_heads}

    plan = []
    for info in header.tensors:
        hf_name = gguf_to_hf_name(info.name)
        if hf_name is None:
            continue
        if not is_float_type(info.ggml_type) and not is_block_type(info.ggml_type):
            raise ValueError(
                f"{path}: tensor {info.name} has unsupported type {type_name(info.ggml_type)}; "
                f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
        layer_suffix = info.name.split(".", 2)[-1]  # "blk.3.attn_q.weight" -> "attn_q.weight"
        if hf_name in keep_quantized and (not is_block_type(info.ggml_type) or len(info.shape) != 2):
            raise ValueError(f"{path}: tensor {info.name} ({type_name(info.ggml_type)}) is not a block-quantized "
                             "matrix")
        plan.append((hf_name, info, permuted_heads.get(layer_suffix, 0)))
    return _load_tensors(path, plan, dtype, keep_quantized)


def _load_tensors(
    path: str, plan: list[tuple[str, GGUFTensorInfo, int]], dtype: torch.dtype, keep_quantized: Collection[str]
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    data = torch.from_numpy(map_file(path))
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
