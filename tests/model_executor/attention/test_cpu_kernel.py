"""The native CPU decode kernel against dense attention in float64, and its fallbacks."""

import logging

import pytest
import torch

from pagedserve.model_executor.attention import cpu_kernel
from pagedserve.native import build

# (head_dim, query heads, KV heads): 64 / 128 / 256 take the AVX-512 path where the CPU has it, 24 the portable one
SHAPES = [(64, 9, 3), (128, 8, 8), (256, 8, 2), (24, 4, 1)]
CONTEXT_LENS = [1, 15, 16, 17, 33, 300]


def reference(q, kv_cache, block_tables, context_lens, window, scale, soft_cap):
    """Dense attention of each sequence's one query over its cached positions (within the window), in float64."""
    _, num_kv_heads, _, block_size, _ = kv_cache.shape
    group = q.shape[1] // num_kv_heads
    out = []
    for i, context_len in enumerate(context_lens.tolist()):
        positions = torch.arange(max(0, context_len - window) if window else 0, context_len)
        blocks = block_tables[i, positions // block_size]
        k = kv_cache[0][:, blocks, positions % block_size].double().repeat_interleave(group, 0)  # [H, L, D]
        v = kv_cache[1][:, blocks, positions % block_size].double().repeat_interleave(group, 0)
        scores = torch.einsum("hd,hld->hl", q[i].double(), k) * scale
        if soft_cap:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        out.append(torch.einsum("hl,hld->hd", torch.softmax(scores, -1), v))
    return torch.stack(out)


def expected_path(head_dim: int) -> str:
    """The AVX-512 loop for the head sizes it is specialised for, on a CPU that has AVX-512; else the portable."""
    has_avx512 = " avx512f " in f" {build.cpu_flags()} "
    return "avx512" if has_avx512 and head_dim in (64, 128, 256) else "portable"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", SHAPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (20, None), (None, 3.0)])
def test_matches_dense_reference(dtype, head_dim, num_heads, num_kv_heads, block_size, window, soft_cap):
    assert cpu_kernel.load_kernel() is not None, "the CPU kernel must build on this machine"
    gen = torch.Generator().manual_seed(head_dim + block_size)
    context_lens = torch.tensor(CONTEXT_LENS)
    blocks_per_seq = (max(CONTEXT_LENS) + block_size - 1) // block_size
    num_blocks = len(CONTEXT_LENS) * blocks_per_seq + 5
    kv_cache = torch.randn(2, num_kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    # scattered blocks; columns past a sequence's context hold garbage ids the kernel must not need
    block_ids = torch.randperm(num_blocks, generator=gen)[: len(CONTEXT_LENS) * blocks_per_seq]
    block_tables = block_ids.view(-1, blocks_per_seq)
    q = torch.randn(len(CONTEXT_LENS), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    window_starts = context_lens - window if window else None

    out = cpu_kernel.paged_decode_attention(q, kv_cache, block_tables, context_lens, window_starts, scale, soft_cap)
    assert cpu_kernel.kernel_path(head_dim) == expected_path(head_dim)

    expected = reference(q, kv_cache, block_tables, context_lens, window, scale, soft_cap)
    # float32 throughout; bfloat16 inputs are exact in float32, so only the output's rounding differs
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


def test_reads_through_a_sliced_block_table():
    """A table that is a column slice of a wider one (row stride > width) is read with its stride."""
    gen = torch.Generator().manual_seed(1)
    kv_cache = torch.randn(2, 2, 40, 16, 64, generator=gen)
    wide = torch.randperm(40, generator=gen)[:30].view(3, 10)
    context_lens = torch.tensor([40, 17, 64])
    q = torch.randn(3, 4, 64, generator=gen)
    out = cpu_kernel.paged_decode_attention(q, kv_cache, wide[:, :4], context_lens, None, 0.125, None)
    expected = reference(q, kv_cache, wide, context_lens, None, 0.125, None)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_reads_queries_in_place_from_a_wider_projection():
    """q as the q columns of a fused qkv projection (rows apart by more than H * D) is read with its row stride."""
    gen = torch.Generator().manual_seed(2)
    kv_cache = torch.randn(2, 2, 12, 16, 64, generator=gen)
    block_tables = torch.randperm(12, generator=gen)[:9].view(3, 3)
    context_lens = torch.tensor([40, 17, 33])
    qkv = torch.randn(3, (4 + 2 * 2) * 64, generator=gen)
    q = qkv[:, : 4 * 64].view(3, 4, 64)
    assert not q.is_contiguous()
    out = cpu_kernel.paged_decode_attention(q, kv_cache, block_tables, context_lens, None, 0.125, None)
    expected = reference(q.contiguous(), kv_cache, block_tables, context_lens, None, 0.125, None)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture
def fresh_kernel():
    cpu_kernel.load_kernel.cache_clear()
    yield
    cpu_kernel.load_kernel.cache_clear()


def test_torch_backend_turns_the_kernel_off(monkeypatch, fresh_kernel):
    monkeypatch.setenv("PAGEDSERVE_ATTENTION_BACKEND", "torch")
    assert cpu_kernel.load_kernel() is None and cpu_kernel.kernel_path(64) == "torch"
    assert not cpu_kernel.supports(torch.zeros(1, 1, 8))


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog, fresh_kernel):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: it must build
    monkeypatch.setenv("CXX", "false")
    with caplog.at_level(logging.WARNING):
        assert cpu_kernel.load_kernel() is None
    assert "PyTorch path" in caplog.text


def test_the_build_is_cached(monkeypatch, tmp_path, fresh_kernel):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cpu_kernel.load_kernel() is not None
    [library] = (tmp_path / "pagedserve" / "kernels").glob("*.so")
    built_at = library.stat().st_mtime_ns
    cpu_kernel.load_kernel.cache_clear()
    assert cpu_kernel.load_kernel() is not None
    assert library.stat().st_mtime_ns == built_at


def test_other_dtypes_are_not_supported():
    assert cpu_kernel.supports(torch.zeros(1, 1, 8))
    assert not cpu_kernel.supports(torch.zeros(1, 1, 8, dtype=torch.float16))


# ---- the AMX prefill kernel -----------------------------------------------------------------------------------

needs_amx = pytest.mark.skipif(
    not cpu_kernel.supports_prefill(torch.empty(1, 1, 64, dtype=torch.bfloat16), 16),
    reason="the prefill kernel needs AMX (amx_bf16) and a C++ compiler",
)


def dense_prefill(q, kv_cache, chunks, tables, block_size, scale, window=None, soft_cap=None):
    """Causal attention of each chunk's queries over its context (a query at p sees keys p - window < k <= p), in
    float64. chunks: (first row, length, context length)."""
    num_heads, num_kv_heads = q.shape[1], kv_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    for (start, length, context), table in zip(chunks, tables):
        positions = torch.arange(context)
        blocks = torch.tensor(table)[positions // block_size]
        k = kv_cache[0][:, blocks, positions % block_size].double().repeat_interleave(group, 0)  # [H, L, D]
        v = kv_cache[1][:, blocks, positions % block_size].double().repeat_interleave(group, 0)
        queries = q[start : start + length].double().transpose(0, 1)  # [H, Tq, D]
        scores = queries @ k.transpose(1, 2) * scale
        if soft_cap:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        query_positions = torch.arange(context - length, context)[:, None]
        visible = positions[None, :] <= query_positions
        if window:
            visible &= positions[None, :] > query_positions - window
        out[start : start + length] = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(0, 1)
    return out


# (new tokens, context): fresh prompts and chunks after cached context, lengths off every tile size
PREFILL_SHAPES = [(37, 37), (5, 300), (100, 100), (1, 33), (64, 64), (17, 80), (130, 200)]


def prefill_batch(shapes, num_heads, num_kv_heads, block_size, seed, head_dim=64):
    """Chunks of the given shapes in scattered blocks. Returns (q, kv_cache, chunks, tables, block_tables)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum((context + block_size - 1) // block_size for _, context in shapes) + 3
    kv_cache = torch.randn(2, num_kv_heads, num_blocks, block_size, head_dim, generator=gen).bfloat16()
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, chunks, row = [], [], 0
    for length, context in shapes:
        tables.append([free.pop() for _ in range((context + block_size - 1) // block_size)])
        chunks.append((row, length, context))
        row += length
    q = torch.randn(row, num_heads, head_dim, generator=gen).bfloat16()
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return q, kv_cache, chunks, tables, block_tables


def run_prefill(q, kv_cache, chunks, block_tables, window=None, soft_cap=None):
    out = torch.zeros_like(q)
    starts, lengths, contexts = (torch.tensor(column) for column in zip(*chunks))
    scale = q.shape[-1] ** -0.5
    cpu_kernel.paged_prefill_attention(out, q, kv_cache, starts, lengths, contexts, block_tables, scale, window,
                                       soft_cap)
    return out


@needs_amx
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (8, 8), (12, 4)])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_prefill_kernel_matches_dense_attention(num_heads, num_kv_heads, block_size, head_dim):
    """Several chunks in one call: fresh prompts and chunks after cached context, lengths off every tile size."""
    q, kv_cache, chunks, tables, block_tables = prefill_batch(PREFILL_SHAPES, num_heads, num_kv_heads, block_size,
                                                              block_size + num_heads, head_dim)
    out = run_prefill(q, kv_cache, chunks, block_tables)
    # bf16 inputs and probabilities: the output's rounding and P's, as PyTorch's own bf16 attention
    torch.testing.assert_close(out.double(), dense_prefill(q, kv_cache, chunks, tables, block_size, head_dim**-0.5),
                               atol=1.5e-2, rtol=1.5e-2)


@needs_amx
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
# smaller than every context, off block and tile sizes, equal to some contexts (33, 64, 100, 300), larger than all
@pytest.mark.parametrize("window", [None, 1, 7, 16, 33, 64, 100, 129, 300, 5000])
def test_prefill_kernel_windows_and_soft_caps(block_size, soft_cap, window, head_dim):
    """Sliding windows and soft-capped scores (a cap of 2 binds: scores here are ~N(0, 1)), with a long context
    whose query tiles each start at a different key."""
    shapes = [*PREFILL_SHAPES, (200, 1000)]
    q, kv_cache, chunks, tables, block_tables = prefill_batch(shapes, 9, 3, block_size, block_size, head_dim)
    out = run_prefill(q, kv_cache, chunks, block_tables, window, soft_cap)
    expected = dense_prefill(q, kv_cache, chunks, tables, block_size, head_dim**-0.5, window, soft_cap)
    torch.testing.assert_close(out.double(), expected, atol=1.5e-2, rtol=1.5e-2)


@needs_amx
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_kernel_reads_nothing_before_the_window(block_size):
    """K/V blocks wholly before every query's window hold NaN: a kernel that computed their tiles would output
    NaN (P = 0 times NaN), so they are skipped."""
    window = 70
    shapes = [(20, 500), (1, 300), (90, 400)]
    q, kv_cache, chunks, tables, block_tables = prefill_batch(shapes, 8, 2, block_size, 7)
    clean = kv_cache.clone()
    for (_, length, context), table in zip(chunks, tables):
        first_visible = context - length - window + 1
        kv_cache[:, :, table[: first_visible // block_size]] = float("nan")
    out = run_prefill(q, kv_cache, chunks, block_tables, window)
    expected = dense_prefill(q, clean, chunks, tables, block_size, 0.125, window)
    torch.testing.assert_close(out.double(), expected, atol=1.5e-2, rtol=1.5e-2)


def test_prefill_kernel_declines_what_it_does_not_do():
    assert not cpu_kernel.supports_prefill(torch.empty(1, 1, 64), 16)  # float32
    assert not cpu_kernel.supports_prefill(torch.empty(1, 1, 96, dtype=torch.bfloat16), 16)  # head_dim 96
    assert not cpu_kernel.supports_prefill(torch.empty(1, 1, 64, dtype=torch.bfloat16), 8)  # block size
