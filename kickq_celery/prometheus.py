"""Prometheus metrics of a kickq namespace (the ``prometheus`` extra).

::

    from prometheus_client import REGISTRY
    from kickq_celery.prometheus import KickqCollector

    REGISTRY.register(KickqCollector(kq))

Every scrape reads :meth:`Kickq.stats` (one Redis round trip); every metric
has the labels ``namespace`` and ``name`` (the job name). ``kickq metrics
--port N`` serves them stand-alone through :func:`serve`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .exceptions import KickqError
from .stats import COUNTERS, GAUGES

if TYPE_CHECKING:
    from .client import Kickq

logger = logging.getLogger("kickq_celery")

#: counter name in Stats -> (metric name without _total, help)
_COUNTER_METRICS = {
    "created": ("kickq_jobs_created", "Jobs created."),
    "succeeded": ("kickq_jobs_succeeded", "Jobs that ended in success."),
    "failed": ("kickq_jobs_failed", "Jobs that failed for good."),
    "retried": ("kickq_jobs_retried", "Failed runs that were retried."),
    "ghosts": ("kickq_ghost_runs", "Ghost runs (timed out, or their worker died)."),
    "deleted": ("kickq_jobs_deleted", "Jobs deleted before they finished."),
}
assert set(_COUNTER_METRICS) == set(COUNTERS)


def _client() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # the metric families (not imported by the package itself)
    except ImportError:
        raise KickqError("Prometheus metrics need prometheus_client: "
                         "pip install 'kickq-celery[prometheus]'") from None
    return prometheus_client


class KickqCollector:
    """A custom ``prometheus_client`` collector of one Kickq namespace.

    Gauges ``kickq_jobs{state=queued|delayed|processing}``, counters
    ``kickq_jobs_created_total`` and friends, processing and waiting time
    (``kickq_process_seconds`` / ``kickq_wait_seconds`` with ``stat=avg|p50|p95|max``
    over the recent sample), completions in a recent ``window`` (``1m``, ``1h``),
    ``kickq_workers`` (live workers that handle the name) and ``kickq_up`` (0 when
    Redis did not answer the scrape).
    """

    def __init__(self, kq: Kickq) -> None:
        self.kq = kq
        self._core = _client().core

    def _families(self) -> dict[str, Any]:
        core = self._core
        labels = ["namespace", "name"]
        families: dict[str, Any] = {
            "up": core.GaugeMetricFamily("kickq_up", "1 when kickq's Redis answered the scrape.",
                                         labels=["namespace"]),
            "jobs": core.GaugeMetricFamily("kickq_jobs", "Jobs now queued, delayed or processing.",
                                           labels=[*labels, "state"]),
            "process": core.GaugeMetricFamily(
                "kickq_process_seconds", "Run duration over the recent sample.", labels=[*labels, "stat"]),
            "wait": core.GaugeMetricFamily(
                "kickq_wait_seconds", "Time from creation to first start over the recent sample.",
                labels=[*labels, "stat"]),
            "completed": core.GaugeMetricFamily(
                "kickq_jobs_completed_recently", "Jobs that finished within the window.",
                labels=[*labels, "window"]),
            "workers": core.GaugeMetricFamily(
                "kickq_workers", "Live workers that handle the job name.", labels=labels),
        }
        for counter, (metric, text) in _COUNTER_METRICS.items():
            families[counter] = core.CounterMetricFamily(metric, text, labels=labels)
        return families

    def describe(self) -> Iterator[Any]:
        """The metric names, without reading Redis (so registering never blocks)."""
        yield from self._families().values()

    def collect(self) -> Iterator[Any]:
        families = self._families()
        namespace = str(self.kq.options["redis_namespace"])
        try:
            stats = self.kq.stats()
        except KickqError as exc:
            logger.warning("kickq: metrics scrape failed: %s", exc)
            families["up"].add_metric([namespace], 0)
            yield families["up"]
            return
        families["up"].add_metric([namespace], 1)
        for name, s in sorted(stats.names.items()):
            for state in GAUGES:
                families["jobs"].add_metric([namespace, name, state], getattr(s, state))
            for counter in COUNTERS:
                families[counter].add_metric([namespace, name], getattr(s, counter))
            for family, summary in (("process", s.process_time), ("wait", s.wait_time)):
                for stat, value in summary.items():
                    if value is not None:
                        families[family].add_metric([namespace, name, stat], value)
            families["completed"].add_metric([namespace, name, "1m"], s.completed_last_minute)
            families["completed"].add_metric([namespace, name, "1h"], s.completed_last_hour)
            families["workers"].add_metric([namespace, name], s.workers)
        yield from families.values()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("kickq metrics: " + format, *args)


def make_metrics_server(kq: Kickq, port: int, addr: str = "0.0.0.0") -> WSGIServer:
    """An HTTP server of ``kq``'s metrics (any path; call ``serve_forever()``)."""
    client = _client()
    registry = client.CollectorRegistry(auto_describe=True)
    registry.register(KickqCollector(kq))
    return make_server(addr, port, client.make_wsgi_app(registry), handler_class=_QuietHandler)


def serve(kq: Kickq, port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``kq``'s metrics in the Prometheus text format until interrupted."""
    server = make_metrics_server(kq, port, addr)
    try:
        server.serve_forever()
    finally:
        server.server_close()
