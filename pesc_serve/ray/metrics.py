"""``/metrics`` of the whole application: every engine replica's Prometheus metrics in one page.

The ingress broadcasts a metrics call to all running replicas (``DeploymentHandle.broadcast``)
and merges the answers; each sample gains a ``replica`` label, and ``pesc:replica_up`` lists
the replicas that answered (1 while the engine is healthy, 0 while it is not).
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


def merge_metrics(reports: list[dict[str, Any]]) -> bytes:
    """One exposition from replica reports (``{"info": {...}, "metrics": text}``)."""
    up = Metric("pesc:replica_up", "Engine replicas that answered the scrape (0: engine not healthy)", "gauge")
    families: dict[str, Metric] = {}
    for report in sorted(reports, key=lambda r: r["info"]["replica"]):
        info = report["info"]
        replica = info["replica"]
        up.add_sample("pesc:replica_up", {"replica": replica, "pid": str(info["pid"]), "node": str(info["node"])},
                      1.0 if info["healthy"] else 0.0)
        for fam in text_string_to_metric_families(report["metrics"]):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            merged.samples.extend(s._replace(labels={**s.labels, "replica": replica}) for s in fam.samples)
    return render([up, *families.values()])


def render(families: Iterable[Metric]) -> bytes:
    """Prometheus text of ready-made metric families."""
    snapshot = list(families)

    class _Snapshot:
        def collect(self) -> list[Metric]:
            return snapshot

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    return generate_latest(registry)
