"""This process's place in the tensor-parallel group, the collectives the model and the runner use, and the rules
for splitting sizes across the ranks.

One group per engine: rank 0 is the engine process (scheduler, sampler), ranks 1.. are workers. With one rank
(the default) nothing is initialised and every collective returns its input untouched, so a model built for
tensor parallelism costs nothing without it.
"""

from datetime import timedelta

import torch
import torch.distributed as dist

from pagedserve.distributed.shm_all_reduce import SLOT_BYTES, ShmAllReduce

_rank = 0
_size = 1
_shm: ShmAllReduce | None = None  # ranks on one CPU machine sum through shared memory, not gloo

# A worker that stops answering fails the others' collectives after this long instead of hanging them.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str) -> None:
    """Join the group (`init_method`: tcp://host:port of rank 0's rendezvous); gloo on CPU, NCCL on GPU. On the
    CPU the all-reduces go through a shared-memory segment (shm_all_reduce.py)."""
    global _rank, _size, _shm
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    _rank, _size = rank, world_size
    if backend == "gloo":
        _shm = ShmAllReduce.create(rank, world_size, COLLECTIVE_TIMEOUT.total_seconds())


def destroy_tensor_parallel() -> None:
    global _rank, _size, _shm
    if _shm is not None:
        _shm.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    _rank, _size, _shm = 0, 1, None


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def divide(total: int, what: str) -> int:
    """`total` split evenly across the ranks; a ValueError naming `what` when it does not split."""
    if total % _size:
        raise ValueError(f"{what}={total} is not divisible by tensor_parallel_size={_size}")
    return total // _size


def check_kv_heads(num_kv_heads: int, size: int) -> None:
    """Key/value heads split evenly across `size` ranks, or each is shared by `size // num_kv_heads` of them (the
    rule `layers.parallel.kv_heads_held` applies)."""
    if num_kv_heads % size and size % num_kv_heads:
        raise ValueError(f"num_key_value_heads={num_kv_heads} is not divisible by tensor_parallel_size={size} "
                         "(nor the other way round)")


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' partial results (in place)."""
    if _size == 1:
        return x
    if _shm is not None and _shm.supports(x):
        return _shm.all_reduce(x)
    dist.all_reduce(x)
    return x


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Each rank's slice of the vocabulary's logits -> the whole row on rank 0 (padding cut off); the other ranks,
    which do not sample, get an empty [rows, 0] tensor."""
    if _size == 1:
        return logits
    logits = logits.contiguous()
    if _shm is not None and _shm.supports(logits) and logits.shape[1] * logits.element_size() <= SLOT_BYTES:
        gathered = _shm.gather(logits)
        return logits[:, :0] if gathered is None else gathered[:, :vocab_size]
    if _rank != 0:
        dist.gather(logits, None, dst=0)
        return logits[:, :0]
    parts = [torch.empty_like(logits) for _ in range(_size)]
    dist.gather(logits, parts, dst=0)
    return torch.cat(parts, dim=-1)[:, :vocab_size]


def broadcast_sampled(token_ids: torch.Tensor) -> torch.Tensor:
    """Rank 0's sampled token ids to every rank (int64, one per sampling row; -1 everywhere if sampling failed)."""
    if _size > 1:
        dist.broadcast(token_ids, src=0)
    return token_ids


def min_across_ranks(value: int, device: torch.device) -> int:
    """The smallest of the ranks' values (their KV block counts must agree)."""
    if _size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
