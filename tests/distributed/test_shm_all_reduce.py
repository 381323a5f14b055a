"""The tensor-parallel shared-memory segment: a random name, created exclusively without following a link, mode
0600, unlinked once mapped; a file (or a link) another user put at its name first is never used."""

import subprocess
import sys

import pytest

CODE = """
import os, stat, sys
import torch, torch.distributed as dist
from pagedserve.distributed import shm_all_reduce

mode = sys.argv[1]
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
seen = {}
make_name = shm_all_reduce.segment_name

def named():
    name = make_name()
    seen["name"] = name
    if mode == "planted":  # another local user got there first: a file, and a link to a file of ours
        with open("/dev/shm/" + name, "w") as f:
            f.write("theirs")
    elif mode == "link":
        os.symlink("/tmp/pagedserve-victim", "/dev/shm/" + name)
    return name

shm_all_reduce.segment_name = named
try:
    shm = shm_all_reduce.ShmAllReduce.create(0, 1, 10.0)
except (FileExistsError, OSError) as e:
    print("refused", type(e).__name__)
    os.unlink("/dev/shm/" + seen["name"])
    sys.exit(0)
assert shm is not None
assert not os.path.exists("/dev/shm/" + seen["name"])  # unlinked once mapped
assert seen["name"] != make_name() and len(seen["name"]) > 40  # random, not the rendezvous port
x = torch.arange(6, dtype=torch.float32)
assert torch.equal(shm.all_reduce(x.clone()), x)
print("ok")
"""


def run(mode: str, port: int) -> str:
    result = subprocess.run([sys.executable, "-c", CODE, mode, str(port)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_the_segment_is_private_random_and_unlinked():
    assert run("plain", 29611) == "ok"


@pytest.mark.parametrize("mode", ["planted", "link"])
def test_a_file_or_link_at_the_segments_name_is_never_used(mode):
    assert run(mode, 29612 if mode == "planted" else 29613).startswith("refused")
