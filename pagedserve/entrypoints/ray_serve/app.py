"""The Ray Serve application of `pagedserve serve --num-replicas N`: an ingress (the OpenAI app) over N engine
replicas routed by `PagedServeRouter`; and running it on a local Ray or a cluster until SIGINT/SIGTERM."""

import logging
import signal
import threading
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve import Application

from pagedserve.engine_args import EngineArgs
from pagedserve.entrypoints.openai.serving import ServingOptions

from .ingress import OpenAIIngress
from .replica import EngineReplica
from .router import DEFAULT_IMBALANCE, ROUTER_CLASS

logger = logging.getLogger("pagedserve")

# Ray's own prefix-aware router (ray.serve.llm's, imported from where it lives: ray.serve.llm itself pulls in
# ray[llm]'s dependencies): it matches the prompt's characters in a tree and knows nothing of sessions
RAY_PREFIX_ROUTER = ("ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router."
                     "PrefixCacheAffinityRouter")
APP_NAME = "pagedserve"
REPLICA_DEPLOYMENT = "EngineReplica"
INGRESS_DEPLOYMENT = "OpenAIIngress"


@dataclass
class ReplicaSettings:
    """How many replicas, how they are routed and placed (the engine arguments are the single server's)."""

    num_replicas: int = 2
    router: str = "session"  # ours: session, prefix, round-robin; or ray-prefix (Ray's PrefixCacheAffinityRouter)
    autoscaling_config: dict | None = None  # Ray Serve's, passed through; replaces num_replicas
    engine_placement: str = "thread"
    max_waiting_requests: int = 4096
    imbalance: int = DEFAULT_IMBALANCE
    replica_cpus: float = 1.0
    ingress_cpus: float = 0.0  # light (text work, routing): never the reason replicas cannot be placed
    shutdown_timeout: float = 30.0
    log_interval: float = 5.0


def build_application(engine_args: EngineArgs, options: ServingOptions, settings: ReplicaSettings,
                      api_key: str | None = None, max_body_bytes: int = 4 << 20) -> Application:
    # Ray Serve counts in-flight requests per replica against this; the engine has its own queue bound
    max_ongoing = engine_args.max_num_seqs + settings.max_waiting_requests
    scaling: dict = ({"autoscaling_config": settings.autoscaling_config} if settings.autoscaling_config
                     else {"num_replicas": settings.num_replicas})
    if settings.router == "ray-prefix":
        router_config: dict = {"request_router_class": RAY_PREFIX_ROUTER}
    else:
        router_config = {"request_router_class": ROUTER_CLASS,
                         "request_router_kwargs": {"policy": settings.router, "block_size": engine_args.block_size,
                                                   "imbalance": settings.imbalance}}
    replica = serve.deployment(
        name=REPLICA_DEPLOYMENT,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        max_ongoing_requests=max_ongoing,
        request_router_config=router_config,
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_wait_loop_s=1.0,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        **scaling,
    )(EngineReplica)
    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT,
        ray_actor_options={"num_cpus": settings.ingress_cpus},
        max_ongoing_requests=max_ongoing * max(settings.num_replicas, 1),
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
    )(serve.ingress()(OpenAIIngress))
    replicas = replica.bind(engine_args, options.model_name, settings.engine_placement,
                            settings.max_waiting_requests, settings.log_interval)
    return ingress.bind(replicas, engine_args, options, api_key, max_body_bytes)


def run(app: Application, host: str, port: int, ray_address: str | None) -> int:
    """Serve `app` on host:port (a local Ray unless `ray_address`) until SIGINT/SIGTERM, then drain: Ray Serve
    stops sending requests and gives open ones the graceful-shutdown timeout. The exit status."""
    ray.init(address=ray_address, logging_level=logging.WARNING)  # not yet loopback-only: see the README
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, whose own SIGTERM handler would kill us
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        logger.info("serving on http://%s:%d (OpenAI API under /v1), replicas on Ray at %s%s", host, port,
                    ray.get_runtime_context().gcs_address, "" if ray_address else " (a local instance)")
        stop.wait()
        logger.info("draining: open requests get up to the graceful-shutdown timeout")
        serve.delete(APP_NAME)  # the ingress drains first (the HTTP proxy stays up for its open streams)
        serve.shutdown()
    finally:
        ray.shutdown()
    logger.info("server stopped")
    return 0
