"""Prometheus metrics for ``imc serve``, kept and exposed by ``prometheus_client``.

One ``CollectorRegistry`` per server (a process may run several, as tests do), rendered
on ``GET /metrics`` in the text format, or in OpenMetrics when the scraper asks for it
(``Accept: application/openmetrics-text``):

- ``imc_served_total{cache,kind}`` / ``imc_served_bytes_total{kind}``: manifests and
  blobs served (``cache=""``: a blob or the store's own image);
- ``imc_cache_hits_total{cache,kind}``: requests answered from what was already local,
  by the cache that answered (``cache=""``: the store's pulled images);
- ``imc_cache_misses_total{kind}``: requests that were not local, answered 404 or
  fetched upstream with pull-through (a miss belongs to no cache);
- ``imc_upstream_bytes_total``: bytes pull-through fetched from upstream registries;
- ``imc_stale_served_total{reason}``: pull-through tags answered with their last
  resolution because the upstream could not answer (``unreachable``, ``timeout``,
  ``server_error``, ``not_found``);
- ``imc_request_duration_seconds{kind}``: a histogram of registry requests, from the
  request head to the last byte of the answer, so a slow transfer shows too;
- ``imc_http_requests_total{code}``: every answered request, by status code;
- ``imc_cache_stale{cache}``: 1 while a tag the cache was built from points elsewhere
  (its ``Stale`` condition), 0 once checked and current; a cache never checked (or
  holding only images pinned by digest) has no series. Read from the records at each
  scrape, so a check by ``imc cache check`` shows as well as the server's own;
- ``imc_build_info{version}`` and the ``process_*`` metrics of the serving process.

Labels are cache names (DNS-1123 labels, validated by the API), fixed kinds and status
codes, so the number of series stays bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from builder import __version__
from builder.errors import ImcError
from builder.server.registry import Outcome

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: from a manifest answered from memory to a large layer over a slow link."""

# A ``_created`` series per counter doubles the output and no dashboard of ours reads it.
prometheus_client.disable_created_metrics()


class _Staleness(Collector):
    """``imc_cache_stale``, read when scraped: the records are the truth about drift."""

    def __init__(self, read: Callable[[], dict[str, bool]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("imc_cache_stale", "1 while a tag the cache was built from points at other "
                                   "content (its Stale condition), 0 once checked and current.", labels=["cache"])
        try:
            stale = self.read()
        except ImcError as e:
            log.warning("imc_cache_stale: cannot read the caches: %s", e.message)
            stale = {}
        for name, value in sorted(stale.items()):
            family.add_metric([name], 1.0 if value else 0.0)
        yield family


class Metrics:
    """The counters and histogram that the registry endpoint and the HTTP layer update
    and ``/metrics`` renders, in a registry of their own."""

    def __init__(self, stale: Callable[[], dict[str, bool]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._served = Counter("imc_served", "Manifests and blobs served, by cache and kind.",
                               ["cache", "kind"], registry=r)
        self._served_bytes = Counter("imc_served_bytes", "Bytes of manifests and blobs served, by kind.",
                                     ["kind"], registry=r)
        self._hits = Counter("imc_cache_hits", "Requests answered from local content, by the cache that answered "
                             "(empty: the store's images) and kind.", ["cache", "kind"], registry=r)
        self._misses = Counter("imc_cache_misses", "Requests for content that was not local (404 or pull-through), "
                               "by kind.", ["kind"], registry=r)
        self._upstream = Counter("imc_upstream_bytes", "Bytes fetched from upstream registries by pull-through.",
                                 registry=r)
        self._stale_served = Counter("imc_stale_served", "Pull-through tags answered with their last resolution "
                                     "because the upstream could not answer, by reason.", ["reason"], registry=r)
        self._durations = Histogram("imc_request_duration_seconds", "Registry requests, from the request to the "
                                    "last byte of the answer, by kind.", ["kind"], buckets=DURATION_BUCKETS,
                                    registry=r)
        self._requests = Counter("imc_http_requests", "Requests answered, by status code.", ["code"], registry=r)
        Info("imc_build", "The version of imc serving.", registry=r).info({"version": __version__})
        ProcessCollector(registry=r)
        if stale is not None:
            r.register(_Staleness(stale))

    def record(self, outcome: Outcome) -> None:
        """Count what answering one registry request did: served, hit or miss, fetched upstream."""
        if outcome.served is not None:
            self._served.labels(outcome.served_cache or "", outcome.kind).inc()
            self._served_bytes.labels(outcome.kind).inc(outcome.served)
        if outcome.hit:
            self._hits.labels(outcome.cache or "", outcome.kind).inc()
        elif outcome.hit is False:
            self._misses.labels(outcome.kind).inc()
        if outcome.upstream_bytes:
            self._upstream.inc(outcome.upstream_bytes)
        if outcome.stale:
            self._stale_served.labels(outcome.stale).inc()

    def observe(self, kind: str, seconds: float) -> None:
        """How long one registry request took, to the last byte of its answer."""
        self._durations.labels(kind).observe(seconds)

    def answered(self, status: int) -> None:
        """One request answered with ``status``."""
        self._requests.labels(str(status)).inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition in the format ``accept`` asks for, and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
