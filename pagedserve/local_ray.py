"""Starting Ray for pagedserve: a local instance that is reachable from this machine only.

`ray.init()` with its defaults starts the dashboard (whose job API runs arbitrary code) and binds Ray's
ports (GCS, raylet, object manager, agents) on the node's address. A local instance needs neither: every
process is on this machine. Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its setting for a single-machine
"cluster") when it is imported, and then binds every port to the loopback address; the processes it starts
inherit it. Joining a cluster (`address` given) is left to the cluster's own settings: its operator must
firewall Ray's ports (see the README).
"""

import logging
import os

LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None = None) -> None:
    """Connect to the Ray cluster at `address`, or start a local, loopback-only instance without a dashboard."""
    if address is None:
        os.environ[LOCAL_ONLY] = "0"  # for this process if Ray is not imported yet, and for Ray's own processes
    import ray
    from ray._private import ray_constants

    if address is None:
        ray_constants.ENABLE_RAY_CLUSTER = False  # read once at Ray's import, which may have come first
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
