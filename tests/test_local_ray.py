"""A local Ray started by pagedserve listens on loopback only and runs no dashboard."""

import subprocess
import sys

CODE = """
import psutil
import ray
from pagedserve.local_ray import init_ray

init_ray()
try:
    ray.get(ray.remote(lambda: 1).remote())  # a worker process too
    ours = psutil.Process().children(recursive=True)
    names = sorted({p.name() for p in ours})
    listening = [(p.name(), c.laddr.ip, c.laddr.port) for p in ours for c in p.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    print(names)
    print(listening)
    assert any(name == "gcs_server" for name in names) and listening, (names, listening)
    exposed = [entry for entry in listening if entry[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, exposed
    assert not any(port == 8265 for _, _, port in listening), "the dashboard serves HTTP"
    for p in ours:  # Ray keeps a head process for usage stats; its web front end and job API are off
        if "dashboard.py" in " ".join(p.cmdline()):
            assert "--modules-to-load=UsageStatsHead" in p.cmdline() and "--disable-frontend" in p.cmdline()
finally:
    ray.shutdown()
"""


def test_a_local_ray_listens_on_loopback_only_without_a_dashboard():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
