"""Tensor-parallel layers: which piece of a weight each rank holds, and how the pieces' results combine.

- Column-parallel (`ColumnParallelLinear`): each rank holds its slice of the output features of every part of a
  fused projection (its query heads, its key/value heads; its gate rows and its up rows). No communication. With
  fewer key/value heads than ranks, each key/value head is held by several ranks (those whose query heads use it).
- Row-parallel (`RowParallelLinear`): each rank holds a slice of the input features and computes a partial sum.
  The model adds the ranks' partials with `parallel_state.all_reduce` right after the layer, not the layer itself:
  after loading, a layer is swapped for a packed or quantized one, and the sum must survive the swap. The bias is
  held by rank 0 only (the others hold zeros), so it is added once.
- Vocab-parallel (`VocabParallelEmbedding`, `ParallelLMHead`): each rank holds a slice of the vocabulary, padded to
  a multiple of the ranks. The embedding looks up its own ids and the ranks' rows are summed; the head's logits are
  gathered to rank 0 (`parallel_state.gather_vocab`), which alone samples.

Each layer knows its own shard layout: `checkpoint_slice` cuts this rank's piece out of a checkpoint tensor, which
is all the loader asks of it. With one rank every layer is its plain torch counterpart.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.config import check_kv_heads
from pagedserve.distributed.parallel_state import all_reduce, divide, tp_rank, tp_size


def kv_heads_held(num_kv_heads: int) -> tuple[int, int]:
    """(first, count) of the key/value heads this rank holds: an even share, or, with fewer key/value heads than
    ranks, the one head its query heads use (held by `tp_size() // num_kv_heads` ranks, as vLLM replicates it)."""
    size, rank = tp_size(), tp_rank()
    check_kv_heads(num_kv_heads, size)
    if num_kv_heads >= size:
        return rank * (num_kv_heads // size), num_kv_heads // size
    return rank // (size // num_kv_heads), 1


class ColumnParallelLinear(nn.Linear):
    """A projection (possibly several fused: gate/up) split by output features. `output_sizes` are the parts'
    full sizes, as in the checkpoint; `local_rows` the (first row, rows) this rank holds of each (default: an even
    share); `local_sizes` the rows alone."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = True,
                 local_rows: list[tuple[int, int]] | None = None) -> None:
        self.output_sizes = list(output_sizes)
        if local_rows is None:
            shares = [divide(size, "output size") for size in output_sizes]
            local_rows = [(tp_rank() * share, share) for share in shares]
        self.local_rows = local_rows
        self.local_sizes = [rows for _, rows in local_rows]
        super().__init__(in_features, sum(self.local_sizes), bias=bias)

    def checkpoint_slice(self, tensor: torch.Tensor, param: str, part: int | None) -> torch.Tensor:
        """This rank's rows of part `part` of the weight or bias; of every part when the checkpoint stores them
        fused (Phi-3's qkv_proj, GPT-2's c_attn)."""
        if tp_size() == 1:
            return tensor
        if part is not None:
            return tensor.narrow(0, *self.local_rows[part])
        if tensor.shape[0] != sum(self.output_sizes):
            return tensor  # the loader reports the mismatch
        pieces = tensor.split(self.output_sizes)
        return torch.cat([p.narrow(0, *rows) for p, rows in zip(pieces, self.local_rows)])


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q/k/v projection: this rank's query heads, and its key/value heads (see `kv_heads_held`)."""

    def __init__(self, in_features: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        q_heads = divide(num_heads, "num_attention_heads")
        first_kv, kv_heads = kv_heads_held(num_kv_heads)
        q_rows = (tp_rank() * q_heads * head_dim, q_heads * head_dim)
        kv_rows = (first_kv * head_dim, kv_heads * head_dim)
        super().__init__(in_features, [num_heads * head_dim, *[num_kv_heads * head_dim] * 2], bias,
                         [q_rows, kv_rows, kv_rows])


class RowParallelLinear(nn.Linear):
    """A projection split by input features; its output is this rank's partial sum (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(divide(in_features, "input size"), out_features, bias=bias)

    def checkpoint_slice(self, tensor: torch.Tensor, param: str, part: int | None) -> torch.Tensor:
        if tp_size() == 1:
            return tensor
        if param == "bias":
            return tensor if tp_rank() == 0 else torch.zeros_like(tensor)
        return tensor.narrow(1, tp_rank() * self.in_features, self.in_features)


def _vocab_rows(vocab_size: int) -> int:
    """Rows per rank: the vocabulary padded up to a multiple of the ranks."""
    return -(-vocab_size // tp_size())


def _vocab_slice(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """This rank's `rows` rows of a [vocab, hidden] checkpoint tensor, zero-padded past the vocabulary's end."""
    if tp_size() == 1:
        return tensor
    start = min(tp_rank() * rows, tensor.shape[0])
    piece = tensor[start : start + rows]
    return F.pad(piece, (0, 0, 0, rows - piece.shape[0])) if piece.shape[0] < rows else piece


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(_vocab_rows(vocab_size), hidden_size)
        self.vocab_start = tp_rank() * self.num_embeddings

    def checkpoint_slice(self, tensor: torch.Tensor, param: str, part: int | None) -> torch.Tensor:
        return _vocab_slice(tensor, self.num_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return super().forward(input_ids)
        local_ids = input_ids - self.vocab_start
        elsewhere = (local_ids < 0) | (local_ids >= self.num_embeddings)  # another rank's rows
        out = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight)
        return all_reduce(out.masked_fill_(elsewhere.unsqueeze(-1), 0))


class ParallelLMHead(nn.Linear):
    """The output projection, split by vocabulary; the model gathers the logits (`parallel_state.gather_vocab`)."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, _vocab_rows(vocab_size), bias=False)

    def checkpoint_slice(self, tensor: torch.Tensor, param: str, part: int | None) -> torch.Tensor:
        return _vocab_slice(tensor, self.out_features)


def fused_layouts(model: nn.Module) -> dict[str, list[int]]:
    """Module name -> the rows this rank holds of each part, for every fused column-parallel projection; taken
    before a layer is swapped for a quantized one, which keeps the rows but not the layer."""
    return {name: m.local_sizes for name, m in model.named_modules() if isinstance(m, ColumnParallelLinear)}
