"""Matcher latency: choosing a cache among 10,000 Ready caches.

A fresh imc home gets 10,000 Ready cache records, as builds leave them (spec images,
resolved digests, a dozen events), over 400 repositories with a skewed popularity:
a few base repositories are in thousands of caches, most are in a handful. Then
``Matcher(caches).best(request)`` runs 200 times, cycling through representative
requests (an exact hit on a popular repository, another version, several images, a
large storage request, a miss, an explicit id), and the median and 95th percentile
are reported against the target of a median under 5 ms. Every call is a real one:
it reads the match index and marks the winner used, a committed write.

There is no peer: the target is the reference. Run this file directly to try it
alone: ``python bench/match_bench.py [--caches 10000]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import Table, fresh_dir

from builder.caches import Caches
from builder.imagecache import (
    READY,
    CacheSpec,
    ImageCache,
    ResolvedImage,
    rfc3339,
)
from builder.matcher import Matcher, MatchRequest
from builder.records import CacheDB

CACHES = 10_000
CALLS = 200
TARGET_MS = 5.0
REGISTRY = "registry.example.com"
REPOSITORIES = [f"{REGISTRY}/team{t}/svc{s}" for t in range(40) for s in range(10)]
SIZES = (20, 20, 20, 40, 40, 60, 100, 200, 500)


def _records(count: int, rnd: random.Random) -> list[ImageCache]:
    """Ready records as finished builds leave them; repository popularity is Zipf-like."""
    weights = [1 / (rank + 1) for rank in range(len(REPOSITORIES))]
    start = time.time() - 365 * 86400
    out = []
    for i in range(count):
        repos = list(dict.fromkeys(rnd.choices(REPOSITORIES, weights, k=rnd.randint(1, 5))))
        images = [f"{repo}:{rnd.randint(1, 12)}.0" for repo in repos]
        created = rfc3339(dt.datetime.fromtimestamp(int(start + rnd.uniform(0, 364 * 86400)), dt.UTC))
        cache = ImageCache(name=f"cache-{i:05d}", id=f"imc-{i:017d}", spec=CacheSpec(images, size_gib=rnd.choice(SIZES)),
                           created=created, phase=READY, progress=100)  # type: ignore[arg-type]
        cache.images = [ResolvedImage(ref, f"sha256:{rnd.getrandbits(256):064x}",
                                      "application/vnd.oci.image.manifest.v1+json", 1200) for ref in images]
        for _ in range(12):
            cache.event("LayerFetched", f"blob sha256:{rnd.getrandbits(256):064x} ({rnd.randint(1, 10**8)} bytes) "
                        "fetched from the registry")
        out.append(cache)
    return out


def populate(home: Path, count: int, rnd: random.Random) -> tuple[list[ImageCache], float]:
    """Write ``count`` records in one transaction, as a database from before the match
    index would hold them, then open it the way imc does, which builds the index.
    Returns the records and the seconds the index build took."""
    path = home / "caches.db"
    CacheDB(path)  # the schema
    records = _records(count, rnd)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE match_index")
        db.executemany("INSERT INTO caches (name, id, auto, doc) VALUES (?, ?, 0, ?)",
                       [(c.name, c.id, json.dumps(c.to_doc())) for c in records])
    start = time.perf_counter()
    CacheDB(path)
    return records, time.perf_counter() - start


def requests(records: list[ImageCache], rnd: random.Random) -> list[tuple[str, MatchRequest]]:
    """Representative requests, drawn from what the records hold."""
    popular = records[0].spec.images[0]
    for c in records:
        if c.spec.images[0].startswith(REPOSITORIES[0] + ":"):
            popular = c.spec.images[0]
            break
    some = rnd.choice(records)
    several = list(some.spec.images[:3]) + [f"{REPOSITORIES[-1]}:1.0"]
    return [
        ("exact image, most popular repository", MatchRequest((popular,), storage_gib=10)),
        ("another version of a held repository", MatchRequest((f"{REPOSITORIES[5]}:99.0",))),
        ("four images, three held", MatchRequest(tuple(several), storage_gib=30)),
        ("large storage request", MatchRequest((popular, f"{REPOSITORIES[1]}:3.0"), storage_gib=300)),
        ("no cache holds it", MatchRequest((f"{REGISTRY}/elsewhere/app:1.0",))),
        ("explicit cache id", MatchRequest((popular,), cache_id=rnd.choice(records).id)),
    ]


def measure(home: Path, cases: list[tuple[str, MatchRequest]], calls: int) -> list[float]:
    """Milliseconds of each of ``calls`` calls, cycling through ``cases``."""
    caches = Caches(home)
    for _, request in cases:  # one untimed call each: imports, first connection
        Matcher(caches).best(request)
    out = []
    for i in range(calls):
        request = cases[i % len(cases)][1]
        start = time.perf_counter()
        Matcher(caches).best(request)
        out.append((time.perf_counter() - start) * 1000)
    return out


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def latency(work: Path, table: Table, count: int = CACHES, calls: int = CALLS) -> None:
    """Add the matcher latency row: median and p95 of ``calls`` matches among ``count`` caches."""
    rnd = random.Random(20261129)
    home = fresh_dir(work / "match-bench")
    records, index_seconds = populate(home, count, rnd)
    cases = requests(records, rnd)
    times = measure(home, cases, calls)
    median = statistics.median(times)
    per_case = {name: statistics.median(times[i::len(cases)]) for i, (name, _) in enumerate(cases)}
    print(f"  (index built for {count} records in {index_seconds:.2f} s; per request, median: " +
          ", ".join(f"{name} {ms:.2f} ms" for name, ms in per_case.items()) + ")", flush=True)
    table.add(f"match among {count:,} Ready caches ({calls} calls)",
              f"{median:.2f} ms median, {p95(times):.2f} ms p95", f"target < {TARGET_MS:g} ms",
              "meets target" if median < TARGET_MS else "**MISSES target**")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", type=int, default=CACHES)
    parser.add_argument("--calls", type=int, default=CALLS)
    args = parser.parse_args()
    table = Table("Matcher latency", ["benchmark", "imc", "target", "result"])
    with tempfile.TemporaryDirectory(prefix="imc-match-bench-") as tmp:
        latency(Path(tmp), table, args.caches, args.calls)
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
