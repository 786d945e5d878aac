"""pdserve's metrics through Ray's metrics export, next to vLLM's and Serve's own.

The router already renders pdserve's metrics as Prometheus text for ``/metrics`` (the
store's, its pools' replicas, the requests it served). ``RayExport`` mirrors those same
families into ``ray.util.metrics`` gauges every few seconds, so every node's metrics agent
serves them (as ``ray_pdserve_*``, Ray's prefix) and Ray's Prometheus and Grafana see them
with no scrape target of their own. One source of numbers, two ways out: ``/metrics`` and
Ray's export cannot disagree.

Everything goes out as a gauge holding the current value: counters as their running totals
and histograms as their cumulative ``_bucket``/``_sum``/``_count`` series, which is what
PromQL's ``rate`` and ``histogram_quantile`` read, whatever the declared type. The store's
and the pools' families are the same in every router replica, so only the replica of rank 0
exports them; each replica exports the requests it served itself (Ray tags each process's
series apart, and Prometheus sums them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families
from ray.util.metrics import Gauge

from kvstore.logging import get_logger

log = get_logger(__name__)


class RayExport:
    """Mirrors Prometheus text into Ray gauges, one per sample name."""

    def __init__(self) -> None:
        self._gauges: dict[str, tuple[Gauge, tuple[str, ...]]] = {}

    def publish(self, text: str) -> int:
        """Set a gauge per sample of ``text``; returns how many samples were exported."""
        n = 0
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                keys = tuple(sorted(sample.labels))
                found = self._gauges.get(sample.name)
                if found is None:
                    found = self._gauges[sample.name] = (
                        Gauge(sample.name, description=fam.documentation or sample.name, tag_keys=keys), keys)
                gauge, declared = found
                if keys != declared:  # a Ray metric's tag keys are fixed when it is made
                    log.warning("metric %s: labels %s differ from %s; sample skipped", sample.name, keys, declared)
                    continue
                gauge.set(float(sample.value), tags=dict(sample.labels) or None)
                n += 1
        return n


class ExportLoop:
    """Every ``period_s``, render and publish (a daemon thread: rendering reads Redis and the
    store agents, which must not block the router's event loop). A failed round is logged
    and the next one tries again; the router never waits on it."""

    def __init__(self, render: Callable[[], str], period_s: float = 5.0) -> None:
        self._render, self._period_s = render, period_s
        self._export = RayExport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-ray-metrics", daemon=True)

    def start(self) -> ExportLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self._period_s):
            try:
                self._export.publish(self._render())
                failures = 0
            except Exception as e:  # noqa: BLE001  (a bad round must not end the loop)
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    log.warning("exporting metrics to Ray failed (%d in a row): %s: %s",
                                failures, type(e).__name__, e)
