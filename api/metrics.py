"""Prometheus figures for GET /metrics, read from the job store at scrape time.

Workers write progress to the store, not to the API process, so the store is the one place every API replica can
count from; a collector computes the figures per scrape instead of keeping counters in this process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select

from service.jobs.job_store import JobEventRow, JobStore

# Seconds: stories260K jobs take seconds, 7B models tens of minutes to hours.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)


def layers_compressed(store: JobStore) -> int:
    """Blocks compressed by every job so far: the progress events that carry a block's metrics (one per block)."""
    query = select(func.count()).select_from(JobEventRow).where(
        JobEventRow.type == "progress", JobEventRow.data["metrics"].as_string().is_not(None)
    )
    with store.session(write=False) as s:
        return int(s.scalar(query) or 0)


class JobCollector:
    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        counts = self.store.counts_by_status()
        jobs = GaugeMetricFamily("llmpress_jobs", "Jobs in the store by status.", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily("llmpress_queue_depth", "Jobs queued and not yet started by a worker.",
                                value=counts.get("queued", 0))

        durations = HistogramMetricFamily("llmpress_job_duration_seconds",
                                          "Seconds from start to end of finished jobs, by final status.",
                                          labels=["status"])
        by_status: dict[str, list[float]] = {}
        for status, seconds in self.store.durations():
            by_status.setdefault(status, []).append(seconds)
        for status, values in sorted(by_status.items()):
            buckets = [(str(float(b)), sum(v <= b for v in values)) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", len(values)))
            durations.add_metric([status], buckets, sum(values))
        yield durations

        layers = CounterMetricFamily("llmpress_layers_compressed", "Decoder blocks compressed, all jobs together.")
        layers.add_metric([], layers_compressed(self.store))
        yield layers


def metrics_registry(store: JobStore) -> CollectorRegistry:
    """A registry of its own per app (tests build several apps in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(store))
    return registry
