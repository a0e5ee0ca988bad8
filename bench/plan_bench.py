"""Plan benchmark: what ``imc cache plan`` moves from the registry, against the image's bytes.

A plan reads manifests and configs only; the row shows the bytes it read (its own
count, ``planBytesRead``) over the large fixture's bytes (manifest, config and
layers, from the catalogue), and how long the plan took. No peer plans a cache.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from harness import IMC, Table, fresh_dir, mb

LARGE = "fixtures/large:1.0"


def moved(endpoints: dict[str, Any], catalogue: dict[str, Any], work: Path, table: Table) -> None:
    registry = endpoints["plain"].host
    image = catalogue["images"][LARGE]
    image_bytes = sum(m["size"] + m["config"]["size"] + m["totalLayerBytes"] for m in image["manifests"])
    home = fresh_dir(work / "plan-home")
    started = time.perf_counter()
    out = subprocess.run([*IMC, "--home", str(home), "cache", "plan", "bench", "--plain-http", registry,
                          "--image", f"{registry}/{LARGE}", "-o", "json"], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    plan = json.loads(out.stdout)
    read = plan["planBytesRead"]
    assert plan["total"]["bytesToFetch"] + plan["total"]["manifestBytes"] == image_bytes, "the plan misses bytes"
    table.add("plan: bytes moved / image bytes (large image, fresh store)",
              f"{read} B of {mb(image_bytes)} in {seconds:.2f} s", "no peer plans", f"{read / image_bytes:.5%}")
