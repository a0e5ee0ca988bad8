"""Prometheus metrics for ``imc serve``, in the text exposition format.

Counters only, kept in memory under one lock: hits and misses per cache, bytes
served, bytes fetched upstream by pull-through. Labels are cache names, which the
API validates as DNS-1123 labels, so they need no escaping beyond the format's.
"""

from __future__ import annotations

import threading
from collections import defaultdict


class Metrics:
    """Counters the registry endpoint updates and ``/metrics`` renders."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: dict[tuple[str, str], int] = defaultdict(int)
        self._bytes: dict[str, int] = defaultdict(int)

    def hit(self, cache: str | None, kind: str, size: int) -> None:
        """A manifest or blob served, from ``cache`` (None: the store or unknown)."""
        with self._lock:
            self._hits[(cache or "", kind)] += 1
            self._bytes[kind] += size

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP imc_served_total Manifests and blobs served, by cache and kind.",
                     "# TYPE imc_served_total counter"]
            for (cache, kind), n in sorted(self._hits.items()):
                lines.append(f'imc_served_total{{cache="{cache}",kind="{kind}"}} {n}')
            lines += ["# HELP imc_served_bytes_total Bytes of manifests and blobs served, by kind.",
                      "# TYPE imc_served_bytes_total counter"]
            for kind, n in sorted(self._bytes.items()):
                lines.append(f'imc_served_bytes_total{{kind="{kind}"}} {n}')
        return "\n".join(lines) + "\n"
