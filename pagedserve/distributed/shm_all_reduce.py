"""All-reduce (and the logits' gather) through shared memory for the tensor-parallel ranks of one CPU machine
(`shm_all_reduce.cpp`).

gloo's all-reduce goes through TCP: measured here at ~0.55 ms for a single 896-wide row between two processes,
and a step makes two per layer. Ranks on one machine can instead share a segment: each copies its tensor into its
slot, publishes a sequence number and sums every slot once all have published (a few microseconds). vLLM's CPU
backend does the same.

The segment is a file in /dev/shm that rank 0 creates under a random name, exclusively (O_EXCL: a file another
local user put there first is never reused), without following a link (O_NOFOLLOW), readable by this user only
(0600); the other ranks learn the name from rank 0 and check the file is this user's, then it is unlinked as soon
as every rank has mapped it, so nothing outlives the group. Its layout: one 64-byte line per rank holding the
last call it published, then two slots of `slot_bytes` per rank. A tensor larger than a slot goes through in
slot-sized pieces. Every rank must make the same calls in the same order, as
the model's forward does.
"""

import ctypes
import mmap
import os
import secrets
import stat
from pathlib import Path

import torch
import torch.distributed as dist

from pagedserve.native import build

_SOURCE = Path(__file__).with_name("shm_all_reduce.cpp")
_HEADER = 4096
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_int64, ctypes.c_double]
SLOT_BYTES = 8 << 20


def segment_name() -> str:
    """A name no one can guess ahead of rank 0 (128 random bits)."""
    return f"pagedserve-tp-{secrets.token_hex(16)}"


class ShmAllReduce:
    def __init__(self, library: ctypes.CDLL, rank: int, world_size: int, timeout_s: float) -> None:
        """Map the group's segment: rank 0 creates it, the others open it (collective: every rank calls this)."""
        self.library, self.rank, self.world_size, self.timeout_s = library, rank, world_size, timeout_s
        size = _HEADER + 2 * world_size * SLOT_BYTES
        names = [segment_name() if rank == 0 else None]
        if rank == 0:
            path = f"/dev/shm/{names[0]}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.ftruncate(fd, size)
        dist.broadcast_object_list(names, src=0)
        if rank != 0:
            path = f"/dev/shm/{names[0]}"
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            info = os.fstat(fd)
            if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != 0o600:
                os.close(fd)
                raise PermissionError(f"{path} is not this user's private segment")
        self.segment = mmap.mmap(fd, size)
        os.close(fd)
        dist.barrier()
        if rank == 0:
            os.unlink(path)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.segment))
        self.seq = 0

    @classmethod
    def create(cls, rank: int, world_size: int, timeout_s: float) -> "ShmAllReduce | None":
        """None where the kernel cannot be built or /dev/shm is missing (gloo's all-reduce is used instead); the
        ranks agree, since they run on one machine with one environment."""
        if world_size > _HEADER // 64:  # the header holds one 64-byte line per rank
            return None
        if not os.path.isdir("/dev/shm") or os.environ.get("PAGEDSERVE_TP_ALL_REDUCE", "shm") != "shm":
            return None
        functions = {f"shm_all_reduce_{suffix}": (ctypes.c_int64, _ARGS) for suffix in _DTYPES.values()}
        functions["shm_gather"] = (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                                    ctypes.c_int64, ctypes.c_double])
        library = build.load(_SOURCE, "the shared-memory all-reduce", functions)
        return None if library is None else cls(library, rank, world_size, timeout_s)

    def supports(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in _DTYPES

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (every rank gets the same bits)."""
        flat = x if x.is_contiguous() else x.contiguous()
        function = getattr(self.library, f"shm_all_reduce_{_DTYPES[x.dtype]}")
        per_slot = SLOT_BYTES // x.element_size()
        address, remaining = flat.data_ptr(), flat.numel()
        while remaining:
            n = min(remaining, per_slot)
            self.seq += 1
            if function(self.base, self.rank, self.world_size, SLOT_BYTES, address, n, self.seq, self.timeout_s):
                raise RuntimeError(f"tensor-parallel all-reduce: a rank did not arrive within {self.timeout_s:.0f} s")
            address += n * x.element_size()
            remaining -= n
        if flat is not x:
            x.copy_(flat)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's [rows, cols] side by side, [rows, ranks x cols], on rank 0 (None on the others). A row must
        fit a slot."""
        x = x.contiguous()
        row_bytes = x.shape[1] * x.element_size()
        assert row_bytes <= SLOT_BYTES
        out = torch.empty(x.shape[0], self.world_size * x.shape[1], dtype=x.dtype) if self.rank == 0 else None
        per_slot = SLOT_BYTES // row_bytes
        for start in range(0, x.shape[0], per_slot):
            rows = min(per_slot, x.shape[0] - start)
            self.seq += 1
            target = out[start:].data_ptr() if out is not None else None
            if self.library.shm_gather(self.base, self.rank, self.world_size, SLOT_BYTES, x[start:].data_ptr(), rows,
                                       row_bytes, target, self.seq, self.timeout_s):
                raise RuntimeError(f"tensor-parallel gather: a rank did not arrive within {self.timeout_s:.0f} s")
        return out

    def close(self) -> None:
        self.segment.close()
