"""``/metrics``: Prometheus text format with the official client library.

Request counters and latency histograms are updated by the API's Guard as
calls finish; everything about agents and directories is read at scrape time
from the same status document the status page shows (a custom collector), so
the figures never drift from what the page says. Each :class:`Metrics` has its
own registry: several homes in one test process do not share counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _HomeCollector:
    def __init__(self, status: Callable[[], dict]) -> None:
        self.status = status

    def collect(self):
        doc = self.status()
        now = time.time()
        instances = [n for c in doc["connectors"] for n in c["instances"]]
        connected = GaugeMetricFamily("tether_connected_instances",
                                      "Enrolled instances with at least one open socket",
                                      labels=["connector"])
        for c in doc["connectors"]:
            connected.add_metric([c["name"]], sum(1 for n in c["instances"] if n["connected"]))
        yield connected
        yield GaugeMetricFamily("tether_agent_sockets", "Open agent sockets on this home",
                                value=sum(len(n["sockets"]) for n in instances))
        lag = GaugeMetricFamily("tether_directory_sync_lag_seconds",
                                "Seconds since the last change batch was applied",
                                labels=["directory"])
        entries = GaugeMetricFamily("tether_directory_entries", "Synced entries",
                                    labels=["directory", "kind"])
        errors = GaugeMetricFamily("tether_directory_error",
                                   "1 while the directory's last sync ended in an error",
                                   labels=["directory"])
        for row in doc["directories"]:
            if row.get("synced_at"):
                lag.add_metric([row["directory"]], max(0.0, now - row["synced_at"]))
            entries.add_metric([row["directory"], "user"], row.get("users") or 0)
            entries.add_metric([row["directory"], "group"], row.get("groups") or 0)
            errors.add_metric([row["directory"]], 1 if row.get("error") else 0)
        yield lag
        yield entries
        yield errors
        spool = GaugeMetricFamily("tether_agent_spool_depth",
                                  "Changes waiting in an agent's spool (when it reports it)",
                                  labels=["instance"])
        for n in instances:
            if isinstance(n.get("spool_depth"), int):
                spool.add_metric([n["instance_id"]], n["spool_depth"])
        yield spool


class Metrics:
    """The API's registry: request counters, latency histograms, home's gauges."""

    def __init__(self, status: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("tether_api_requests", "API calls by operation and outcome",
                                ["op", "outcome"], registry=self.registry)
        self.latency = Histogram("tether_api_request_seconds", "API call latency",
                                 ["op"], buckets=BUCKETS, registry=self.registry)
        self.registry.register(_HomeCollector(status))

    def observe(self, op: str, outcome: str, seconds: float) -> None:
        self.requests.labels(op, outcome).inc()
        self.latency.labels(op).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
