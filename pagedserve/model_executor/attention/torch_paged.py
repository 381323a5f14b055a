"""Portable paged attention in PyTorch (the CPU path, and the reference for other backends).

The batch is flat: tokens of all requests back to back. K/V of new tokens are written into the paged
cache through `slot_mapping`; attention reads each request's context back through its block table.
Decode rows (one query token) are done together in one batched call over their gathered blocks; each
prefill chunk is its own call (with no cached context it uses its fresh K/V directly, causally).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    query_start: int  # first row of the chunk in the flat batch
    query_len: int
    context_len: int  # tokens of K/V the chunk attends to, its own included
    block_ids: torch.Tensor  # blocks covering the context


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64: position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    decode_rows: torch.Tensor  # [Bd] int64: rows of the flat batch that are single-token decodes
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] int64 (padded with 0)
    decode_mask: torch.Tensor  # [1, Bd, 1, max_blocks * block_size] bool: True where the slot is context
    prefills: list[PrefillChunk]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> "AttentionMetadata":
        """From per-request query lengths, context lengths (computed + new) and block tables."""
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        ctx_lens = torch.tensor(context_lens, dtype=torch.int64)
        starts = torch.cumsum(q_lens, 0) - q_lens
        max_blocks = max(len(b) for b in block_tables)
        tables = torch.tensor([b + [0] * (max_blocks - len(b)) for b in block_tables], dtype=torch.int64)

        # slot of every new token: its request's block at position // block_size, plus the offset
        req_of_row = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
        positions = torch.arange(int(q_lens.sum())) - starts[req_of_row] + (ctx_lens - q_lens)[req_of_row]
        slot_mapping = tables[req_of_row, positions // block_size] * block_size + positions % block_size

        is_decode = q_lens == 1
        decode_reqs = torch.nonzero(is_decode).flatten()
        decode_tables = tables[decode_reqs]
        decode_ctx = ctx_lens[decode_reqs]
        if len(decode_reqs):
            num_decode_blocks = int(((decode_ctx + block_size - 1) // block_size).max())
            decode_tables = decode_tables[:, :num_decode_blocks]
        slots = torch.arange(decode_tables.shape[1] * block_size)
        decode_mask = (slots[None, :] < decode_ctx[:, None])[None, :, None, :]

        prefills = [
            PrefillChunk(
                int(starts[i]), query_lens[i], context_lens[i],
                tables[i, : (context_lens[i] + block_size - 1) // block_size].to(device),
            )
            for i in torch.nonzero(~is_decode).flatten().tolist()
        ]
        return cls(
            positions=positions.to(device),
            slot_mapping=slot_mapping.to(device),
            decode_rows=starts[decode_reqs].to(device),
            decode_block_tables=decode_tables.to(device),
            decode_mask=decode_mask.to(device),
            prefills=prefills,
        )


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
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] (this step's tokens). Returns [T, H, D]."""
    write_kv(kv_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads

    if len(meta.decode_rows):
        # [Hkv, Bd, G, D] x [Hkv, Bd, D, L]: GQA without repeating K/V; batched matmuls over (Hkv, Bd).
        num_decodes = len(meta.decode_rows)
        kv = gather_kv(kv_cache, meta.decode_block_tables.flatten()).view(2, num_kv_heads, num_decodes, -1, head_dim)
        qd = q[meta.decode_rows].view(num_decodes, num_kv_heads, group, head_dim).transpose(0, 1)
        scores = torch.matmul(qd, kv[0].transpose(-1, -2)) * scale
        scores.masked_fill_(~meta.decode_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[meta.decode_rows] = torch.matmul(probs, kv[1]).transpose(0, 1).reshape(num_decodes, num_heads, head_dim)

    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, Tq, D]: 4-D inputs take the fused CPU kernel
        if chunk.context_len == chunk.query_len:  # no cached context: attend to this chunk, causally
            kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            mask = None
        else:
            kv = gather_kv(kv_cache, chunk.block_ids)[:, :, : chunk.context_len]
            kp, vp = kv[0], kv[1]
            # query i sits at position context_len - query_len + i and sees keys up to there
            offset = chunk.context_len - chunk.query_len
            mask = torch.ones(chunk.query_len, chunk.context_len, dtype=torch.bool, device=q.device).tril(offset)
        kp = kp.repeat_interleave(group, dim=0).unsqueeze(0)
        vp = vp.repeat_interleave(group, dim=0).unsqueeze(0)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=scale)
        out[rows] = o[0].transpose(0, 1)
    return out
