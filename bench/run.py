"""`make bench`: every benchmark side by side with its peer, in one run.

Starts its own registries (plain HTTP and TLS) on loopback, pushes the large fixture,
runs each benchmark, prints the rows as they come and writes bench/RESULTS.md.
``make bench BENCH=pull,serve`` runs only some sections.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from builder.oci import Descriptor
from builder.store import Store

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR), str(BENCH_DIR.parent / "registry-fixtures")]

import cache_bench  # noqa: E402  (the imports below need the paths above)
import match_bench  # noqa: E402
import plan_bench  # noqa: E402
import pull_bench  # noqa: E402
import regfix  # noqa: E402
import serve_bench  # noqa: E402
import volume_bench  # noqa: E402
from harness import IMC, ROOT, Table  # noqa: E402

SECTIONS = ("pull", "cache", "volume", "serve", "match")


def _large_blobs(registry: str, work: Path) -> tuple[Path, list[Descriptor]]:
    """The large image pulled into a store: the blobs a volume of it holds."""
    home = work / "volume-source"
    subprocess.run([*IMC, "--home", str(home), "pull", "-q", "--plain-http", registry,
                    f"{registry}/{cache_bench.LARGE}"], check=True, capture_output=True)
    store = Store(home)
    image = store.images()[0]
    manifest = store.manifest(image.descriptor.digest)
    return home, [image.descriptor, *manifest.blobs()]  # type: ignore[union-attr]


def _notes(results: Path) -> str:
    """What RESULTS.md holds under ``## `` headings (the tables' are ``### ``): notes
    written by hand, such as the pull path's profile, which a run keeps as they are."""
    try:
        text = results.read_text()
    except FileNotFoundError:
        return ""
    at = text.find("\n## ")
    return "\n" + text[at + 1:] if at >= 0 else ""


def main() -> int:
    wanted = [s for s in os.environ.get("BENCH", ",".join(SECTIONS)).split(",") if s]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        print(f"unknown BENCH sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
        return 2
    tables: list[Table] = []

    def section(title: str) -> Table:
        table = Table(title, ["benchmark", "imc", "peer", "ratio"])
        print(f"\n{title}", flush=True)
        tables.append(table)
        return table

    with tempfile.TemporaryDirectory(prefix="imc-bench-") as tmp:
        work = Path(tmp)
        registries = regfix.RegistrySet(work / "registries", modes=("plain", "tls"))
        with registries:
            print("pushing the fixtures (large image included)...", flush=True)
            catalogue = registries.push_fixtures(large=True)
            endpoints = registries.endpoints
            registry = endpoints["plain"].host
            if "pull" in wanted:
                table = section(f"Pull: imc against skopeo (median of {pull_bench.ROUNDS} alternating runs, "
                                "whole-command wall time)")
                pull_bench.throughput(endpoints, catalogue, work, table)
                pull_bench.shared_base(endpoints, catalogue, work, table)
                pull_bench.memory(endpoints, work, table)
            if "cache" in wanted:
                table = section("Caches: flash and reuse (median of 3 runs)")
                cache_bench.flash(endpoints, work, table)
                cache_bench.reuse(endpoints, catalogue, work, table)
                plan_bench.moved(endpoints, catalogue, work, table)
            if "volume" in wanted:
                table = section("Volumes: packing against tar | zstd -T0")
                home, blobs = _large_blobs(registry, work)
                volume_bench.packing(home, blobs, work, table)
            if "serve" in wanted:
                table = section(f"Serving: imc serve against registry:2 (median of {serve_bench.ROUNDS} runs)")
                serve_bench.throughput(endpoints, catalogue, work, table)
                serve_bench.stale_serve(registries.storage, catalogue, work, table)
                serve_bench.headline(registries.storage, catalogue, work, table)
            if "match" in wanted:
                table = section("Matcher latency")
                match_bench.latency(work, table)
    header = (f"# Benchmark results\n\nRun {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
              f"{platform.machine()} ({os.cpu_count()} cores), Python {platform.python_version()}; registry:2 "
              "(docker-registry 2.8) and skopeo 1.9 on loopback. Throughput ratios above 1.0x favour imc; for "
              "memory and time ratios, below 1.0x favours imc.\n\n")
    results = ROOT / "bench" / "RESULTS.md"
    results.write_text(header + "\n".join(t.markdown() for t in tables) + _notes(results))
    print(f"\nwrote {ROOT / 'bench' / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
