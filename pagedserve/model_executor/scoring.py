"""Logits at every position of a token sequence, teacher-forced, outside the engine: for perplexity and for
checking a model variant (quantized weights, a kernel path) against another position by position."""

import torch

from pagedserve.model_executor.attention.torch_paged import AttentionMetadata
from pagedserve.model_executor.registry import CausalLM

_BLOCK_SIZE = 16


def teacher_forced_logits(model: CausalLM, ids: list[int], decode: bool, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
    """float32 logits [len(ids), vocab]: row i predicts ids[i + 1]. One prefill of all of `ids` (the batched
    kernels), or with `decode` one step per token (the one-row kernels). Gives the model a fresh KV cache."""
    num_blocks = -(-len(ids) // _BLOCK_SIZE)
    for attn in model.attention_layers():
        attn.kv_cache = torch.zeros(2, attn.num_kv_heads, num_blocks, _BLOCK_SIZE, attn.head_dim, dtype=dtype,
                                    device=device)
    table = [list(range(num_blocks))]
    with torch.inference_mode():
        if not decode:
            meta = AttentionMetadata.build([len(ids)], [len(ids)], [len(ids)], table, _BLOCK_SIZE, device)
            return model.compute_logits(model(torch.tensor(ids, device=device), meta.positions, meta))
        steps = []
        for i, token in enumerate(ids):
            meta = AttentionMetadata.build([1], [i + 1], [len(ids)], table, _BLOCK_SIZE, device)
            steps.append(model.compute_logits(model(torch.tensor([token], device=device), meta.positions, meta)))
        return torch.cat(steps)
