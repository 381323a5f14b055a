"""The paged attention backend against dense attention: sliding windows, soft-capping, a custom scale.

Decode rows run twice: through the native CPU kernel and through the portable PyTorch path.
"""

import pytest
import torch

from pagedserve.model_executor.attention import cpu_kernel
from pagedserve.model_executor.attention.torch_paged import AttentionMetadata, paged_attention, write_kv

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8
# (tokens already in the cache, tokens computed this step): decodes, fresh prefills, chunks after a prefix;
# chunks over 256 queries take several score matrices in the soft-capped path
REQUESTS = [(0, 40), (50, 1), (70, 1), (30, 20), (4, 1), (100, 30), (0, 1), (9, 1), (0, 300), (20, 280)]


def dense_attention(q, k, v, first_position, scale, window, soft_cap):
    """q: [Tq, H, D] at positions first_position...; k, v: [Tk, Hkv, D] at positions 0...Tk-1."""
    group = NUM_HEADS // NUM_KV_HEADS
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    q_pos = torch.arange(first_position, first_position + q.shape[0])[:, None]
    k_pos = torch.arange(k.shape[0])[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.fixture(params=["native", "torch"])
def decode_backend(request, monkeypatch):
    """Decode rows through the native kernel or the PyTorch path; afterwards, check that path is the one ran."""
    kernel_calls = []
    real_kernel = cpu_kernel.paged_decode_attention

    def counted(*args, **kwargs):
        kernel_calls.append(1)
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(cpu_kernel, "paged_decode_attention", counted)
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernel, "supports", lambda q: False)
    else:
        assert cpu_kernel.load_kernel() is not None, "the CPU kernel must build on this machine"
    yield request.param
    assert bool(kernel_calls) == (request.param == "native"), f"decode rows did not take the {request.param} path"


def build_batch(block_size, head_dim=HEAD_DIM, dtype=torch.float32):
    """REQUESTS in scattered blocks, earlier tokens' K/V already cached. Returns (q, k, v of this step, kv_cache,
    metadata, per request (q, full k, full v))."""
    gen = torch.Generator().manual_seed(0)
    num_blocks = sum((c + n + block_size - 1) // block_size for c, n in REQUESTS) + 3
    kv_cache = torch.zeros(2, NUM_KV_HEADS, num_blocks, block_size, head_dim, dtype=dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()  # scattered blocks
    block_tables, per_request = [], []
    for cached, new in REQUESTS:
        total = cached + new
        table = [free.pop() for _ in range((total + block_size - 1) // block_size)]
        k, v = torch.randn(2, total, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
        positions = torch.arange(cached)
        slots = torch.tensor(table)[positions // block_size] * block_size + positions % block_size
        write_kv(kv_cache, k[:cached], v[:cached], slots)  # what earlier steps wrote
        block_tables.append(table)
        per_request.append((torch.randn(new, NUM_HEADS, head_dim, generator=gen).to(dtype), k, v))

    meta = AttentionMetadata.build(
        [n for _, n in REQUESTS], [c + n for c, n in REQUESTS], [c + n for c, n in REQUESTS],
        block_tables, block_size, torch.device("cpu"),
    )
    q = torch.cat([q for q, _, _ in per_request])
    k = torch.cat([k[c:] for (c, _), (_, k, _) in zip(REQUESTS, per_request)])
    v = torch.cat([v[c:] for (c, _), (_, _, v) in zip(REQUESTS, per_request)])
    return q, k, v, kv_cache, meta, per_request


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("window", [None, 1, 8, 33, 1000])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
def test_matches_dense_attention(block_size, window, soft_cap, decode_backend):
    q, k, v, kv_cache, meta, per_request = build_batch(block_size)
    scale = 0.3
    out = paged_attention(q, k, v, kv_cache, meta, scale, window, soft_cap)

    row = 0
    for (cached, new), (q_req, k_full, v_full) in zip(REQUESTS, per_request):
        expected = dense_attention(q_req, k_full, v_full, cached, scale, window, soft_cap)
        torch.testing.assert_close(out[row : row + new], expected, atol=1e-5, rtol=1e-5)
        row += new


@pytest.mark.skipif(
    not cpu_kernel.supports_prefill(torch.empty(1, 1, 64, dtype=torch.bfloat16), 16),
    reason="the prefill kernel needs AMX (amx_bf16) and a C++ compiler",
)
@pytest.mark.parametrize("head_dim,block_size,window,soft_cap,kernel_runs", [
    (64, 16, None, None, True), (64, 16, 1000, None, True), (64, 16, 33, None, True), (64, 16, 1, None, True),
    (64, 16, None, 2.0, True), (64, 16, 33, 2.0, True), (128, 16, 33, 2.0, True),
    (64, 4, 33, 2.0, False), (96, 16, 33, 2.0, False),  # blocks of 4 (not whole key tiles), head_dim 96: SDPA
])
def test_bf16_prefill_takes_the_amx_kernel_where_it_applies(monkeypatch, head_dim, block_size, window, soft_cap,
                                                            kernel_runs):
    """bf16 with head_dim 64 or 128 and blocks of 16: every prefill chunk in one kernel call, windows and soft-caps
    included."""
    calls = []
    real_kernel = cpu_kernel.paged_prefill_attention
    monkeypatch.setattr(cpu_kernel, "paged_prefill_attention", lambda *args: calls.append(1) or real_kernel(*args))
    q, k, v, kv_cache, meta, per_request = build_batch(block_size, head_dim=head_dim, dtype=torch.bfloat16)
    out = paged_attention(q, k, v, kv_cache, meta, 0.125, window, soft_cap)
    assert bool(calls) == kernel_runs
    row = 0
    for (cached, new), (q_req, k_full, v_full) in zip(REQUESTS, per_request):
        expected = dense_attention(q_req.double(), k_full.double(), v_full.double(), cached, 0.125, window, soft_cap)
        torch.testing.assert_close(out[row : row + new].double(), expected, atol=2e-2, rtol=2e-2)
        row += new


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("window", [1, 5, 16, 17])
def test_windowed_decode_reads_only_the_window(block_size, window):
    """Decode rows gather just the blocks their window touches, and those blocks cover it."""
    context_lens = [3, 40, 41, 64, 100]
    tables = [list(range(i * 100, i * 100 + (c + block_size - 1) // block_size)) for i, c in enumerate(context_lens)]
    meta = AttentionMetadata.build(
        [1] * len(context_lens), context_lens, context_lens, tables, block_size, torch.device("cpu")
    )
    block_ids, mask = meta.decode_view(window)
    assert block_ids.shape[1] <= (window - 1 + block_size - 1) // block_size + 1
    for i, ctx in enumerate(context_lens):
        seen = {
            int(block_ids[i, j // block_size]) * block_size + j % block_size
            for j in torch.nonzero(mask[0, i, 0]).flatten().tolist()
        }
        positions = range(max(0, ctx - window), ctx)
        assert seen == {tables[i][p // block_size] * block_size + p % block_size for p in positions}
