"""Sparse mixture-of-experts feed-forward: a softmax router picks top-k experts per token.

Experts are batched by expert: the flat (token, slot) assignments are sorted by expert id, each expert
runs its gate/up and down projections as one matmul over its group of tokens (an expert with no
tokens is skipped), and one `index_add_` sums the weighted outputs back per token, in ascending
expert order as transformers adds them. The experts' weights and one expert's MLP are the experts layer's
quantization method's (float: `quantization.unquantized`; int8 / int4: `quantization.int_linear`).

Under tensor parallelism the experts are split by rank (experts [first_expert, first_expert + num_experts) live
here): each rank runs the (token, slot) pairs routed to its own experts, and the block sums the ranks' outputs.
"""

import torch
from torch import nn

from pagedserve.distributed.parallel_state import all_reduce, divide, tp_rank, tp_size
from pagedserve.model_executor.layers.linear import NO_QUANTIZATION, Router
from pagedserve.model_executor.layers.quantization.base import WeightItem
from pagedserve.model_executor.layers.quantization.config import QuantizationConfig


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) over the experts, top-k, optionally renormalised to sum to 1: (weights, expert ids)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


class FusedExperts(nn.Module):
    """`num_experts` SwiGLU MLPs (this rank's), held by its quantization method (float: transformers' fused 3-D
    `gate_up_proj` [E, 2 I, H] and `down_proj` [E, H, I])."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.num_experts = divide(num_experts, "num_experts")
        self.first_expert = tp_rank() * self.num_experts  # the global id of this rank's first expert
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.quant_method = (quant_config or NO_QUANTIZATION).experts_method(self, prefix)
        self.quant_method.create_weights(self)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts' weighted outputs, summed per token (a partial sum under tensor parallelism)."""
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.flatten()
        order = flat_ids.argsort()
        counts = torch.bincount(flat_ids, minlength=self.first_expert + self.num_experts).tolist()
        first = sum(counts[: self.first_expert])  # the pairs of this rank's experts are a run of `order`
        counts = counts[self.first_expert : self.first_expert + self.num_experts]
        order = order[first : first + sum(counts)]
        token_ids = order // top_k
        routed = x[token_ids]  # the input of each (token, slot) pair, grouped by expert
        outputs = torch.empty_like(routed)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            outputs[rows] = self.quant_method.expert_forward(self, expert, routed[rows])
            start += count
        outputs *= weights.flatten()[order].unsqueeze(1).to(outputs.dtype)
        return torch.zeros_like(x).index_add_(0, token_ids, outputs)

    def checkpoint_slice(self, tensor: torch.Tensor, param: str, part: int | None) -> torch.Tensor:
        """This rank's experts of a checkpoint that stores them fused ([experts, ...], transformers 5)."""
        return tensor.narrow(0, self.first_expert, self.num_experts) if tp_size() > 1 else tensor

    def weight_names(self) -> tuple[str, ...]:
        return ("gate_up_proj", "down_proj")

    def local_expert(self, expert: int) -> int | None:
        """This rank's index of global expert `expert`; None for another rank's (a ValueError past the last)."""
        held = self.num_experts
        if not self.first_expert <= expert < self.first_expert + held and expert < held * tp_size():
            return None
        expert -= self.first_expert
        if expert >= held:
            raise ValueError(f"expert {expert} is out of range (the model has {held})")
        return expert

    def weight_loader(self, param: str, item: WeightItem, expert: int | None, shard: int | None) -> None:
        """Load one expert's tensor (this rank's index, `local_expert`), or, `expert` None, all experts' fused."""
        if expert is None and isinstance(item, torch.Tensor):
            item = self.checkpoint_slice(item, param, shard)
        self.quant_method.load_weight(self, param, item, expert, shard)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)


class SparseMoeBlock(nn.Module):
    """Router (`gate`) + experts, with an optional always-on shared expert scaled by a sigmoid gate (Qwen2-MoE)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        hidden_act: str = "silu",
        shared_expert: nn.Module | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported for MoE experts (supported: silu)")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and the number of experts ({num_experts})")
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Router(hidden_size, num_experts, False, quant_config, f"{prefix}.gate")
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, quant_config, f"{prefix}.experts")
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = Router(hidden_size, 1, False, quant_config, f"{prefix}.shared_expert_gate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        out = all_reduce(self.experts(x, weights, expert_ids))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
