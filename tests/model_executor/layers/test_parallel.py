"""Each tensor-parallel layer's shard layout, checked by playing every rank in turn in this process: the ranks'
pieces of a checkpoint tensor make the whole, and their partial results sum (or concatenate) to one rank's."""

import pytest
import torch

from pagedserve.distributed import parallel_state
from pagedserve.model_executor.layers import parallel
from pagedserve.model_executor.layers.moe import FusedExperts, select_experts
from pagedserve.model_executor.layers.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


def as_rank(monkeypatch, rank: int, size: int) -> None:
    monkeypatch.setattr(parallel_state, "_rank", rank)
    monkeypatch.setattr(parallel_state, "_size", size)


def test_column_parallel_slices_every_part(monkeypatch):
    sizes = [64, 32, 32]  # q, k, v
    whole = torch.randn(128, 16)
    parts = whole.split(sizes)
    pieces = []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        layer = ColumnParallelLinear(16, sizes, bias=True)
        assert layer.local_sizes == [32, 16, 16] and layer.out_features == 64
        by_part = [layer.checkpoint_slice(p, "weight", i) for i, p in enumerate(parts)]
        fused = layer.checkpoint_slice(whole, "weight", None)  # a checkpoint storing q/k/v fused
        torch.testing.assert_close(fused, torch.cat(by_part))
        pieces.append(by_part)
    for i, part in enumerate(parts):
        torch.testing.assert_close(torch.cat([pieces[0][i], pieces[1][i]]), part)


def test_fewer_kv_heads_than_ranks_are_shared(monkeypatch):
    """2 key/value heads over 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1, each with its one query head."""
    head_dim, whole = 4, torch.randn(4 * 4 + 2 * 2 * 4, 8)  # q: 4 heads, k and v: 2 heads
    q, k, v = whole.split([16, 8, 8])
    for rank in range(4):
        as_rank(monkeypatch, rank, 4)
        layer = QKVParallelLinear(8, head_dim, num_heads=4, num_kv_heads=2, bias=False)
        assert layer.local_sizes == [4, 4, 4]
        kv_head = slice(rank // 2 * head_dim, (rank // 2 + 1) * head_dim)
        expected = torch.cat([q[rank * head_dim : (rank + 1) * head_dim], k[kv_head], v[kv_head]])
        torch.testing.assert_close(layer.checkpoint_slice(whole, "weight", None), expected)
    as_rank(monkeypatch, 0, 4)
    with pytest.raises(ValueError, match="num_key_value_heads=3 is not divisible by tensor_parallel_size=4"):
        QKVParallelLinear(8, head_dim, num_heads=12, num_kv_heads=3, bias=False)


def test_row_parallel_partials_sum_to_the_whole_with_the_bias_once(monkeypatch):
    full = torch.nn.Linear(32, 8)
    x = torch.randn(3, 32)
    total = torch.zeros(3, 8)
    monkeypatch.setattr(parallel, "all_reduce", lambda x: x)  # the test sums the ranks' partials itself
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        layer = RowParallelLinear(32, 8)
        with torch.no_grad():
            layer.weight.copy_(layer.checkpoint_slice(full.weight, "weight", None))
            layer.bias.copy_(layer.checkpoint_slice(full.bias, "bias", None))
        total += layer(x[:, rank * 16 : (rank + 1) * 16]).detach()
    torch.testing.assert_close(total, full(x).detach())


def test_vocab_parallel_embedding_and_head_pad_an_odd_vocabulary(monkeypatch):
    vocab, hidden = 509, 8
    table = torch.randn(vocab, hidden)
    ids = torch.tensor([0, 254, 255, 508, 3])
    monkeypatch.setattr(parallel, "all_reduce", lambda x: x)  # the test sums the ranks itself
    embedded = torch.zeros(len(ids), hidden)
    logits = []
    x = torch.randn(2, hidden)
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        embedding, head = VocabParallelEmbedding(vocab, hidden), ParallelLMHead(hidden, vocab)
        assert embedding.num_embeddings == head.out_features == 255
        with torch.no_grad():
            embedding.weight.copy_(embedding.checkpoint_slice(table, "weight", None))
            head.weight.copy_(head.checkpoint_slice(table, "weight", None))
        if rank == 1:
            assert torch.all(embedding.weight[-1] == 0)  # the padding row
        embedded += embedding(ids).detach()
        logits.append(head(x).detach())
    torch.testing.assert_close(embedded, table[ids])
    torch.testing.assert_close(torch.cat(logits, dim=-1)[:, :vocab], x @ table.T)


@pytest.mark.parametrize("top_k", [1, 3])
def test_experts_split_by_rank_sum_to_all_experts(monkeypatch, top_k):
    full = FusedExperts(8, 16, 12)
    torch.nn.init.normal_(full.gate_up_proj, std=0.3)
    torch.nn.init.normal_(full.down_proj, std=0.3)
    x = torch.randn(10, 16)
    weights, expert_ids = select_experts(torch.randn(10, 8), top_k, renormalize=True)
    total = torch.zeros(10, 16)
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        experts = FusedExperts(8, 16, 12)
        assert (experts.first_expert, experts.num_experts) == (4 * rank, 4)
        with torch.no_grad():
            experts.gate_up_proj.copy_(experts.checkpoint_slice(full.gate_up_proj, "gate_up_proj", None))
            experts.down_proj.copy_(experts.checkpoint_slice(full.down_proj, "down_proj", None))
        total += experts(x, weights, expert_ids).detach()
    torch.testing.assert_close(total, full(x, weights, expert_ids).detach())


def test_a_size_that_does_not_split_is_a_value_error(monkeypatch):
    as_rank(monkeypatch, 0, 3)
    with pytest.raises(ValueError, match="output size=64 is not divisible by tensor_parallel_size=3"):
        ColumnParallelLinear(16, [64])
    with pytest.raises(ValueError, match="num_experts=8 is not divisible by tensor_parallel_size=3"):
        FusedExperts(8, 16, 12)
