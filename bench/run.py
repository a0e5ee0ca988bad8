"""`make bench`: every benchmark side by side with its peer, in one run.

Starts its own registries (plain HTTP and TLS) on loopback, pushes the large fixture,
runs each benchmark, prints the rows as they come and writes bench/RESULTS.md.
"""

from __future__ import annotations

import datetime
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, Table  # noqa: E402

import pull_bench  # noqa: E402
import regfix  # noqa: E402


def main() -> int:
    tables = []
    with tempfile.TemporaryDirectory(prefix="imc-bench-") as tmp:
        work = Path(tmp)
        registries = regfix.RegistrySet(work / "registries", modes=("plain", "tls"))
        with registries:
            print("pushing the fixtures (large image included)...", flush=True)
            catalogue = registries.push_fixtures(large=True)
            endpoints = registries.endpoints
            pull = Table("Pull: imc against skopeo (median of "
                         f"{pull_bench.ROUNDS} alternating runs, whole-command wall time)",
                         ["benchmark", "imc", "skopeo", "ratio"])
            print(pull.title, flush=True)
            pull_bench.throughput(endpoints, catalogue, work, pull)
            pull_bench.shared_base(endpoints, catalogue, work, pull)
            pull_bench.memory(endpoints, work, pull)
            tables.append(pull)
    header = (f"# Benchmark results\n\nRun {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
              f"{platform.machine()}, Python {platform.python_version()}; registry:2 "
              "(docker-registry) on loopback. Ratios above 1.0x favour imc for throughput; "
              "for memory, below 1.0x favours imc.\n\n")
    (ROOT / "bench" / "RESULTS.md").write_text(header + "\n".join(t.markdown() for t in tables))
    print(f"wrote {ROOT / 'bench' / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
