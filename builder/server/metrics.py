"""Prometheus metrics for ``imc serve``, in the text exposition format.

Kept in memory under one lock, rendered on ``GET /metrics``:

- ``imc_served_total{cache,kind}`` / ``imc_served_bytes_total{kind}``: manifests and
  blobs served (``cache=""``: a blob or the store's own image);
- ``imc_cache_hits_total{cache,kind}``: requests answered from what was already local,
  by the cache that answered (``cache=""``: the store's pulled images);
- ``imc_cache_misses_total{kind}``: requests that were not local, answered 404 or
  fetched upstream with pull-through (a miss belongs to no cache);
- ``imc_upstream_bytes_total``: bytes pull-through fetched from upstream registries;
- ``imc_request_duration_seconds{kind}``: a histogram of registry requests, from the
  request head to the last byte of the answer, so a slow transfer shows too.

Labels are cache names (DNS-1123 labels, validated by the API) and fixed kinds, so they
need no escaping beyond the format's.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from builder.server.registry import Outcome

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: from a manifest answered from memory to a large layer over a slow link."""


class _Histogram:
    """Cumulative bucket counts, sum and count for one label set."""

    def __init__(self) -> None:
        self.buckets = [0] * len(DURATION_BUCKETS)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(DURATION_BUCKETS):
            if value <= bound:
                self.buckets[i] += 1
        self.total += value
        self.count += 1


class Metrics:
    """Counters and a histogram that the registry endpoint and the HTTP layer update
    and ``/metrics`` renders."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._served: dict[tuple[str, str], int] = defaultdict(int)
        self._served_bytes: dict[str, int] = defaultdict(int)
        self._hits: dict[tuple[str, str], int] = defaultdict(int)
        self._misses: dict[str, int] = defaultdict(int)
        self._upstream = 0
        self._durations: dict[str, _Histogram] = defaultdict(_Histogram)

    def record(self, outcome: Outcome) -> None:
        """Count what answering one registry request did: served, hit or miss, fetched upstream."""
        with self._lock:
            if outcome.served is not None:
                self._served[(outcome.served_cache or "", outcome.kind)] += 1
                self._served_bytes[outcome.kind] += outcome.served
            if outcome.hit:
                self._hits[(outcome.cache or "", outcome.kind)] += 1
            elif outcome.hit is False:
                self._misses[outcome.kind] += 1
            self._upstream += outcome.upstream_bytes

    def observe(self, kind: str, seconds: float) -> None:
        """How long one registry request took, to the last byte of its answer."""
        with self._lock:
            self._durations[kind].observe(seconds)

    def render(self) -> str:
        """The exposition text: HELP and TYPE lines, then one line per series."""
        with self._lock:
            lines = ["# HELP imc_served_total Manifests and blobs served, by cache and kind.",
                     "# TYPE imc_served_total counter"]
            for (cache, kind), n in sorted(self._served.items()):
                lines.append(f'imc_served_total{{cache="{cache}",kind="{kind}"}} {n}')
            lines += ["# HELP imc_served_bytes_total Bytes of manifests and blobs served, by kind.",
                      "# TYPE imc_served_bytes_total counter"]
            for kind, n in sorted(self._served_bytes.items()):
                lines.append(f'imc_served_bytes_total{{kind="{kind}"}} {n}')
            lines += [("# HELP imc_cache_hits_total Requests answered from local content, by the cache that "
                      "answered (empty: the store's images) and kind."),
                      "# TYPE imc_cache_hits_total counter"]
            for (cache, kind), n in sorted(self._hits.items()):
                lines.append(f'imc_cache_hits_total{{cache="{cache}",kind="{kind}"}} {n}')
            lines += [("# HELP imc_cache_misses_total Requests for content that was not local (404 or pull-through), "
                      "by kind."),
                      "# TYPE imc_cache_misses_total counter"]
            for kind, n in sorted(self._misses.items()):
                lines.append(f'imc_cache_misses_total{{kind="{kind}"}} {n}')
            lines += ["# HELP imc_upstream_bytes_total Bytes fetched from upstream registries by pull-through.",
                      "# TYPE imc_upstream_bytes_total counter",
                      f"imc_upstream_bytes_total {self._upstream}"]
            lines += [("# HELP imc_request_duration_seconds Registry requests, from the request to the last byte "
                      "of the answer, by kind."),
                      "# TYPE imc_request_duration_seconds histogram"]
            for kind, h in sorted(self._durations.items()):
                for bound, n in zip(DURATION_BUCKETS, h.buckets, strict=True):
                    lines.append(f'imc_request_duration_seconds_bucket{{kind="{kind}",le="{bound}"}} {n}')
                lines.append(f'imc_request_duration_seconds_bucket{{kind="{kind}",le="+Inf"}} {h.count}')
                lines.append(f'imc_request_duration_seconds_sum{{kind="{kind}"}} {h.total:.6f}')
                lines.append(f'imc_request_duration_seconds_count{{kind="{kind}"}} {h.count}')
        return "\n".join(lines) + "\n"
