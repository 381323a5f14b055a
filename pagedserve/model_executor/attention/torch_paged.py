"""Portable paged attention in PyTorch (the CPU path, and the reference for other backends).

The batch is flat: tokens of all requests back to back. K/V of new tokens are written into the paged
cache through `slot_mapping`; attention reads each request's context back through its block table.
Decode rows (one query token) are done together in one batched call over their gathered blocks; each
prefill chunk is its own call (with no cached context it uses its fresh K/V directly, causally). A request that
verifies a speculative draft (its last token and k drafted ones) is k + 1 decode rows, each attending to the
context up to itself: its K/V are in the cache before attention reads it, so the causal mask is the context length.

A layer may have a sliding window W (a query at position p sees keys at p - W < k <= p, as transformers'
masks) and tanh soft-capping of its scores (Gemma 2). With a window, only the blocks it covers are read.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pagedserve.model_executor.attention import cpu_kernel


@dataclass
class PrefillChunk:
    query_start: int  # first row of the chunk in the flat batch
    query_len: int
    context_len: int  # tokens of K/V the chunk attends to, its own included
    block_ids: torch.Tensor  # blocks covering the context


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64: position of each new token in its sequence
    prompt_lens: torch.Tensor  # [T] int64: prompt length of each token's request (LongRoPE picks its factors by it)
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    decode_rows: torch.Tensor  # [Bd] int64: rows of the flat batch that are single-token decodes
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] int64 (padded with 0)
    decode_mask: torch.Tensor  # [1, Bd, 1, max_blocks * block_size] bool: True where the slot is context
    decode_context_lens: torch.Tensor  # [Bd] int64
    max_decode_context_len: int
    block_size: int
    prefills: list[PrefillChunk]
    # the prefill chunks again, as int64 tensors for a kernel that takes them all at once: first row in the
    # flat batch, length, context length, and block tables [C, max blocks] (padded with 0)
    prefill_query_starts: torch.Tensor
    prefill_query_lens: torch.Tensor
    prefill_context_lens: torch.Tensor
    prefill_block_tables: torch.Tensor
    # sliding window -> (block tables, mask) of the decode rows: made by the first layer with that window
    _decode_windows: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        prompt_lens: Sequence[int],
        block_tables: np.ndarray | Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str,
        verifying: Sequence[bool] | None = None,
    ) -> "AttentionMetadata":
        """From per-request query lengths, context lengths (computed + new), prompt lengths and block tables
        (the model runner's persistent rows, [R, width] with at least each request's blocks; lists are padded).
        `verifying[i]`: request i's query tokens are a draft to verify (decode rows, one per token).

        The index arithmetic is NumPy: a step's metadata is a few dozen small operations, and a NumPy one costs
        about a microsecond where a torch one costs several."""
        tables = block_tables if isinstance(block_tables, np.ndarray) else _padded(block_tables)
        q_lens = np.asarray(query_lens, dtype=np.int64)
        ctx_lens = np.asarray(context_lens, dtype=np.int64)
        starts = np.cumsum(q_lens) - q_lens

        # slot of every new token: its request's block at position // block_size, plus the offset
        req_of_row = np.repeat(np.arange(len(q_lens)), q_lens)
        positions = np.arange(int(q_lens.sum())) - starts[req_of_row] + (ctx_lens - q_lens)[req_of_row]
        slot_mapping = tables[req_of_row, positions // block_size] * block_size + positions % block_size

        is_decode = q_lens == 1
        if verifying is not None:
            is_decode |= np.asarray(verifying, dtype=bool)
        decode_reqs = np.flatnonzero(is_decode)
        rows_per_req = q_lens[decode_reqs]
        row_req = np.repeat(decode_reqs, rows_per_req)
        offset = np.arange(len(row_req)) - np.repeat(np.cumsum(rows_per_req) - rows_per_req, rows_per_req)
        decode_rows = starts[row_req] + offset
        decode_ctx = ctx_lens[row_req] - q_lens[row_req] + offset + 1
        max_decode_ctx = int(decode_ctx.max()) if len(decode_reqs) else 0
        decode_tables = tables[row_req, : -(-max_decode_ctx // block_size)]
        slots = np.arange(decode_tables.shape[1] * block_size)
        decode_mask = (slots[None, :] < decode_ctx[:, None])[None, :, None, :]

        prefill_reqs = np.flatnonzero(~is_decode)
        prefill_width = -(-int(ctx_lens[prefill_reqs].max()) // block_size) if len(prefill_reqs) else 0
        prefill_tables = tables[prefill_reqs, :prefill_width]

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device)

        prefill_block_tables = tensor(prefill_tables)
        prefills = [
            PrefillChunk(int(starts[i]), int(q_lens[i]), int(ctx_lens[i]),
                         prefill_block_tables[row, : -(-int(ctx_lens[i]) // block_size)])
            for row, i in enumerate(prefill_reqs.tolist())
        ]
        return cls(
            positions=tensor(positions),
            prompt_lens=tensor(np.asarray(prompt_lens, dtype=np.int64)[req_of_row]),
            slot_mapping=tensor(slot_mapping),
            decode_rows=tensor(decode_rows),
            decode_block_tables=tensor(decode_tables),
            decode_mask=tensor(decode_mask),
            decode_context_lens=tensor(decode_ctx),
            max_decode_context_len=max_decode_ctx,
            block_size=block_size,
            prefills=prefills,
            prefill_query_starts=tensor(starts[prefill_reqs]),
            prefill_query_lens=tensor(q_lens[prefill_reqs]),
            prefill_context_lens=tensor(ctx_lens[prefill_reqs]),
            prefill_block_tables=prefill_block_tables,
        )

    def decode_view(self, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables and mask of the decode rows; with a window, only the blocks the window covers."""
        if sliding_window is None or self.max_decode_context_len <= sliding_window:
            return self.decode_block_tables, self.decode_mask
        if sliding_window not in self._decode_windows:
            self._decode_windows[sliding_window] = self._window_view(sliding_window)
        return self._decode_windows[sliding_window]

    def _window_view(self, sliding_window: int) -> tuple[torch.Tensor, torch.Tensor]:
        block_size = self.block_size
        num_blocks = self.decode_block_tables.shape[1]
        # W consecutive positions touch at most ceil((W - 1) / block_size) + 1 blocks
        num_window_blocks = min(num_blocks, (sliding_window + 2 * block_size - 2) // block_size)
        window_start = self.decode_context_lens - sliding_window  # first position the query sees
        first = torch.clamp(window_start, min=0) // block_size
        first = torch.clamp(first, max=num_blocks - num_window_blocks)  # stay inside the table
        device = first.device
        columns = first[:, None] + torch.arange(num_window_blocks, device=device)
        tables = self.decode_block_tables.gather(1, columns)
        slots = (columns[:, :, None] * block_size + torch.arange(block_size, device=device)).flatten(1)
        mask = (slots < self.decode_context_lens[:, None]) & (slots >= window_start[:, None])
        return tables, mask[None, :, None, :]


def _padded(block_tables: Sequence[Sequence[int]]) -> np.ndarray:
    """Ragged block tables as one array, padded with block 0."""
    width = max(len(table) for table in block_tables)
    tables = np.zeros((len(block_tables), width), dtype=np.int64)
    for row, table in enumerate(block_tables):
        tables[row, : len(table)] = table
    return tables


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache: [2, Hkv, num_blocks, block_size, D]; k, v: [T, Hkv, D]."""
    _, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    slots = kv_cache.view(2, num_kv_heads, num_blocks * block_size, head_dim)
    slots[0].index_copy_(1, slot_mapping, k.transpose(0, 1))
    slots[1].index_copy_(1, slot_mapping, v.transpose(0, 1))


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """K/V of the given blocks, [2, Hkv, len(block_ids) * block_size, D], contiguous.

    One dim-0 `index_select` per (K/V, head) slice: each copies whole contiguous blocks, where a single
    `index_select` on dim 1 takes a slow strided path (7x slower here at 256 sequences).
    """
    _, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    slices = kv_cache.view(2 * num_kv_heads, num_blocks, block_size, head_dim)
    out = kv_cache.new_empty(2 * num_kv_heads, len(block_ids), block_size, head_dim)
    for i in range(2 * num_kv_heads):
        torch.index_select(slices[i], 0, block_ids, out=out[i])
    return out.view(2, num_kv_heads, -1, head_dim)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] (this step's tokens). Returns [T, H, D]."""
    write_kv(kv_cache, k, v, meta.slot_mapping)
    native_decode = len(meta.decode_rows) and cpu_kernel.supports(q)
    if native_decode:
        window_starts = None
        if sliding_window is not None and meta.max_decode_context_len > sliding_window:
            window_starts = meta.decode_context_lens - sliding_window
        decode_out = cpu_kernel.paged_decode_attention(
            q if len(meta.decode_rows) == len(q) else q[meta.decode_rows],  # all decode: q is read in place
            kv_cache, meta.decode_block_tables, meta.decode_context_lens, window_starts, scale, soft_cap,
        )
        if len(meta.decode_rows) == len(q):  # a decode-only step: the kernel's result is the output
            return decode_out
    out = torch.empty_like(q)
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads

    if native_decode:
        out[meta.decode_rows] = decode_out
    elif len(meta.decode_rows):
        # [Hkv, Bd, G, D] x [Hkv, Bd, D, L]: GQA without repeating K/V; batched matmuls over (Hkv, Bd).
        num_decodes = len(meta.decode_rows)
        block_tables, mask = meta.decode_view(sliding_window)
        kv = gather_kv(kv_cache, block_tables.flatten()).view(2, num_kv_heads, num_decodes, -1, head_dim)
        qd = q[meta.decode_rows].view(num_decodes, num_kv_heads, group, head_dim).transpose(0, 1)
        scores = torch.matmul(qd, kv[0].transpose(-1, -2)) * scale
        if soft_cap is not None:
            scores.div_(soft_cap).tanh_().mul_(soft_cap)
        scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[meta.decode_rows] = torch.matmul(probs, kv[1]).transpose(0, 1).reshape(num_decodes, num_heads, head_dim)

    prefills = meta.prefills
    if prefills and cpu_kernel.supports_prefill(q, meta.block_size):
        cpu_kernel.paged_prefill_attention(
            out, q, kv_cache, meta.prefill_query_starts, meta.prefill_query_lens, meta.prefill_context_lens,
            meta.prefill_block_tables, scale, sliding_window, soft_cap,
        )
        prefills = []
    for chunk in prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        start = chunk.context_len - chunk.query_len  # position of the chunk's first query
        # a window shorter than the context is the only case that differs from plain causal attention
        window = sliding_window if sliding_window is not None and chunk.context_len > sliding_window else None
        if start > 0 and window is None and soft_cap is None and q.device.type == "cpu":
            context = gather_kv(kv_cache, chunk.block_ids[: (start + meta.block_size - 1) // meta.block_size])
            out[rows] = _attention_after_context(
                q[rows].transpose(0, 1), context[:, :, :start], k[rows].transpose(0, 1), v[rows].transpose(0, 1),
                scale,
            ).transpose(0, 1)
            continue
        key_start = 0  # position of the first key
        if start == 0:  # no cached context: attend to this chunk's fresh K/V
            kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            first_block = 0 if window is None else max(0, start - window + 1) // meta.block_size
            key_start = first_block * meta.block_size
            kv = gather_kv(kv_cache, chunk.block_ids[first_block:])[:, :, : chunk.context_len - key_start]
            kp, vp = kv[0], kv[1]
        chunk_mask = None
        if start > 0 or window is not None:
            # query i sits at position start + i and sees keys up to there (and within the window)
            q_pos = torch.arange(start, chunk.context_len, device=q.device)[:, None]
            k_pos = torch.arange(key_start, chunk.context_len, device=q.device)[None, :]
            chunk_mask = k_pos <= q_pos
            if window is not None:
                chunk_mask &= k_pos > q_pos - window
        out[rows] = _prefill_attention(q[rows].transpose(0, 1), kp, vp, chunk_mask, scale, soft_cap).transpose(0, 1)
    return out


def _prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, soft_cap: float | None
) -> torch.Tensor:
    """q: [H, Tq, D]; k, v: [Hkv, Tk, D]; mask: [Tq, Tk] bool (None: causal, Tq == Tk). Returns [H, Tq, D]."""
    if soft_cap is not None:
        return _soft_capped_attention(q, k, v, mask, scale, soft_cap)
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, dim=0).unsqueeze(0)
    v = v.repeat_interleave(group, dim=0).unsqueeze(0)
    # 4-D inputs take the fused CPU kernel
    return F.scaled_dot_product_attention(q.unsqueeze(0), k, v, attn_mask=mask, is_causal=mask is None, scale=scale)[0]


def _attention_after_context(
    q: torch.Tensor, context: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """A chunk's queries over the cached context (all of it visible) and over the chunk itself (causal), as
    two flash-attention calls merged by their log-sum-exps: no [Tq, Tk] mask to build and apply (measured: the
    mask's construction alone was 13% of a prefill step at 3k tokens). q: [H, Tq, D]; context: [2, Hkv, Tc, D];
    k, v: [Hkv, Tq, D]. Returns [H, Tq, D]."""
    num_heads, num_queries, head_dim = q.shape
    num_kv_heads = k.shape[0]
    group = num_heads // num_kv_heads
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # the context is visible to every query: a KV head's query heads are rows of one call (no K/V repeated)
    grouped = q.reshape(1, num_kv_heads, group * num_queries, head_dim)
    out_context, lse_context = flash(grouped, context[0].unsqueeze(0), context[1].unsqueeze(0), 0.0, False,
                                     scale=scale)[:2]
    out_context = out_context.reshape(num_heads, num_queries, head_dim)
    lse_context = lse_context.reshape(num_heads, num_queries)
    keys = k.repeat_interleave(group, dim=0).unsqueeze(0)  # causal: each query head on its own
    values = v.repeat_interleave(group, dim=0).unsqueeze(0)
    out_chunk, lse_chunk = flash(q.unsqueeze(0), keys, values, 0.0, True, scale=scale)[:2]
    out_chunk, lse_chunk = out_chunk[0], lse_chunk[0]
    lse = torch.logaddexp(lse_context, lse_chunk)
    weight_context = (lse_context - lse).exp_().unsqueeze(-1)
    weight_chunk = (lse_chunk - lse).exp_().unsqueeze(-1)
    return (out_context.float() * weight_context + out_chunk.float() * weight_chunk).to(q.dtype)


_QUERY_CHUNK = 256  # queries per score matrix in soft-capped prefill: bounds its memory at long contexts


def _soft_capped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, soft_cap: float
) -> torch.Tensor:
    """SDPA has no soft-capping: scores by hand, grouped query heads as matmul rows (no K/V repetition).

    Scores are capped, masked and normalised in float32 in place: bf16 element-wise ops are slow on CPUs.
    """
    num_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[:2]
    group = num_heads // num_kv_heads
    if mask is None:
        mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=q.device).tril()
    q = q.view(num_kv_heads, group, num_queries, head_dim)
    out = q.new_empty(num_kv_heads, group, num_queries, head_dim)
    for start in range(0, num_queries, _QUERY_CHUNK):
        rows = slice(start, start + _QUERY_CHUNK)
        num_rows = min(_QUERY_CHUNK, num_queries - start)
        scores = torch.matmul(q[:, :, rows].reshape(num_kv_heads, group * num_rows, head_dim), k.transpose(-1, -2))
        scores = scores.float().mul_(scale).div_(soft_cap).tanh_().mul_(soft_cap)
        scores = scores.view(num_kv_heads, group, num_rows, num_keys).masked_fill_(~mask[rows], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(num_kv_heads, group * num_rows, num_keys)
        out[:, :, rows] = torch.matmul(probs, v).view(num_kv_heads, group, num_rows, head_dim)
    return out.view(num_heads, num_queries, head_dim)
