"""Tensor-parallel layers: which piece of a weight each rank holds, and how the pieces' results combine.

- Column-parallel (`ColumnParallelLinear`): each rank holds its slice of the output features of every part of a
  fused projection (its query heads, its key/value heads; its gate rows and its up rows). No communication. With
  fewer key/value heads than ranks, each key/value head is held by several ranks (those whose query heads use it).
- Row-parallel (`RowParallelLinear`): each rank holds a slice of the input features and computes a partial sum,
  which the layer adds across the ranks (`parallel_state.all_reduce`) whatever its quantization method. The bias
  is held by rank 0 only (the others hold zeros), so it is added once.
- Vocab-parallel (`VocabParallelEmbedding`, `ParallelLMHead`): each rank holds a slice of the vocabulary, padded to
  a multiple of the ranks. The embedding looks up its own ids and the ranks' rows are summed; the head's logits are
  gathered to rank 0 (`parallel_state.gather_vocab`), which alone samples.

Each layer knows its own shard layout: `checkpoint_slice` cuts this rank's piece out of a checkpoint tensor, and
`local_sizes` are its fused parts' rows, which is all the loader asks of it. With one rank every layer is its plain
counterpart. Every layer holds its weight through its quantization method (layers/linear.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.distributed.parallel_state import all_reduce, check_kv_heads, divide, tp_rank, tp_size
from pagedserve.model_executor.layers.linear import NO_QUANTIZATION, LinearBase
from pagedserve.model_executor.layers.quantization.base import LinearMethod, WeightItem
from pagedserve.model_executor.layers.quantization.config import QuantizationConfig


def kv_heads_held(num_kv_heads: int) -> tuple[int, int]:
    """(first, count) of the key/value heads this rank holds: an even share, or, with fewer key/value heads than
    ranks, the one head its query heads use (held by `tp_size() // num_kv_heads` ranks, as vLLM replicates it)."""
    size, rank = tp_size(), tp_rank()
    check_kv_heads(num_kv_heads, size)
    if num_kv_heads >= size:
        return rank * (num_kv_heads // size), num_kv_heads // size
    return rank // (size // num_kv_heads), 1


class ColumnParallelLinear(LinearBase):
    """A projection (possibly several fused: gate/up) split by output features. `output_sizes` are the parts'
    full sizes, as in the checkpoint; `local_rows` the (first row, rows) this rank holds of each (default: an even
    share); `local_sizes` the rows alone."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = True,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 local_rows: list[tuple[int, int]] | None = None) -> None:
        self.output_sizes = list(output_sizes)
        if local_rows is None:
            shares = [divide(size, "output size") for size in output_sizes]
            local_rows = [(tp_rank() * share, share) for share in shares]
        self.local_rows = local_rows
        local_sizes = [rows for _, rows in local_rows]
        super().__init__(in_features, sum(local_sizes), bias, quant_config, prefix, local_sizes)

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

    def __init__(self, in_features: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        q_heads = divide(num_heads, "num_attention_heads")
        first_kv, kv_heads = kv_heads_held(num_kv_heads)
        q_rows = (tp_rank() * q_heads * head_dim, q_heads * head_dim)
        kv_rows = (first_kv * head_dim, kv_heads * head_dim)
        super().__init__(in_features, [num_heads * head_dim, *[num_kv_heads * head_dim] * 2], bias, quant_config,
                         prefix, [q_rows, kv_rows, kv_rows])


class GateUpLinear(ColumnParallelLinear):
    """A fused gate/up projection whose output is only ever used as act(gate) * up (gated MLPs): `activation` is
    "silu" (SwiGLU, which a method may fuse into its matmuls) or "gelu_pytorch_tanh" (Gemma's GeGLU)."""

    def __init__(self, in_features: int, intermediate_size: int, bias: bool, activation: str,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        self.silu_gate_up = activation == "silu"
        super().__init__(in_features, [intermediate_size, intermediate_size], bias, quant_config, prefix)

    def act_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu_gate_up:
            return self.quant_method.silu_and_mul(self, x)
        gate, up = self(x).chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


class RowParallelLinear(LinearBase):
    """A projection split by input features: each rank computes its partial sum, and the layer sums them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(divide(in_features, "input size"), out_features, bias, quant_config, prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.quant_method.apply(self, x))

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


class VocabParallelEmbedding(nn.Module):
    """The token embedding, its table held through its quantization method (`out_features` rows of
    `in_features`, as the methods see a table)."""

    silu_gate_up = False

    def __init__(self, vocab_size: int, hidden_size: int, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = hidden_size, _vocab_rows(vocab_size)
        self.num_embeddings = self.out_features
        self.local_sizes = [self.out_features]
        self.vocab_start = tp_rank() * self.num_embeddings
        self.quant_method = (quant_config or NO_QUANTIZATION).embedding_method(self, prefix)
        self.quant_method.create_weights(self)
        self.bias: nn.Parameter | None = None  # tables have none

    def checkpoint_slice(self, tensor: torch.Tensor, param: str, part: int | None) -> torch.Tensor:
        return _vocab_slice(tensor, self.num_embeddings)

    def weight_names(self) -> tuple[str, ...]:
        return ("weight",)

    def weight_loader(self, param: str, item: WeightItem, shard: int | None) -> None:
        if isinstance(item, torch.Tensor):
            item = self.checkpoint_slice(item, param, shard)
        self.quant_method.load_weight(self, item, shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return self.quant_method.embedding(self, input_ids)
        local_ids = input_ids - self.vocab_start
        elsewhere = (local_ids < 0) | (local_ids >= self.num_embeddings)  # another rank's rows
        out = self.quant_method.embedding(self, local_ids.masked_fill(elsewhere, 0))
        return all_reduce(out.masked_fill_(elsewhere.unsqueeze(-1), 0))


class ParallelLMHead(LinearBase):
    """The output projection, split by vocabulary; the model gathers the logits (`parallel_state.gather_vocab`).
    Tied to the embedding (`tied_to`), it takes the embedding's format and, once `tie_to` is called, its tensors."""

    def __init__(self, hidden_size: int, vocab_size: int, quant_config: QuantizationConfig | None = None,
                 prefix: str = "lm_head", tied_to: VocabParallelEmbedding | None = None) -> None:
        method = None if tied_to is None else tied_to.quant_method.tied_head_method()
        super().__init__(hidden_size, _vocab_rows(vocab_size), False, quant_config, prefix, quant_method=method)

    def choose_method(self, quant_config: QuantizationConfig, prefix: str) -> LinearMethod:
        return quant_config.logits_method(self, prefix)

    def checkpoint_slice(self, tensor: torch.Tensor, param: str, part: int | None) -> torch.Tensor:
        return _vocab_slice(tensor, self.out_features)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's tensors (a float table, or a GGUF file's blocks); again after `to_empty`, which
        unties shared tensors."""
        own = {name for name, _ in (*self.named_parameters(recurse=False), *self.named_buffers(recurse=False))}
        for name, tensor in (*embedding.named_parameters(recurse=False), *embedding.named_buffers(recurse=False)):
            if name not in own:
                raise ValueError(f"the head holds no {name!r} to tie to the embedding's")
            setattr(self, name, tensor)
