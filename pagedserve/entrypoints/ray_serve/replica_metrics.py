"""`/metrics` of a replicated server: every replica's Prometheus series, each with a `replica` label (summing
over it gives the single server's figures)."""

from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray.serve.handle import DeploymentHandle

CALL_TIMEOUT_S = 30.0  # a call to every replica waits this long at most


class ReplicaMetrics:
    """Every replica's Prometheus series, each with a `replica` label; `refresh` fetches them again."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle
        self.texts: dict[str, str] = {}

    @property
    def registry(self) -> "ReplicaMetrics":
        return self  # prometheus_client's generate_latest wants an object with collect()

    async def refresh(self) -> None:
        """A replica that does not answer is left out (it is dying, or Serve is replacing it)."""
        results = await self.handle.broadcast("metrics_text").results_async(timeout_s=CALL_TIMEOUT_S,
                                                                            return_exceptions=True)
        self.texts = {r[0]: r[1] for r in results if isinstance(r, tuple)}

    def collect(self) -> list[Metric]:
        families: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
        return list(families.values())
