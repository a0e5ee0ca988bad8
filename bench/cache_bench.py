"""Cache benchmarks: flash against a bare pull, and reuse against a cold build.

- Flash: ``imc cache create --flash --wait`` on the large fixture, timing when the
  ``FlashReady`` line appears (usable from staging) and when the command ends (volume
  packed), against a bare ``imc pull`` of the same image into an empty store.
- Reuse: a second image sharing all but one layer with the large fixture; its cache
  built with reuse after the first cache's staging copy was reclaimed, so shared
  layers come from the first cache's volume. Bytes fetched must be exactly the new
  layer's; time is compared with the new bytes' share of the cold build.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import imagegen
from harness import IMC, Table, fresh_dir, run_measured

LARGE = "fixtures/large:1.0"
SIBLING = "bench/sibling:1.0"
NEW_LAYER_BYTES = 40 << 20


def _imc(home: Path, *args: str) -> list[str]:
    return [*IMC, "--home", str(home), *args]


def _timed_create(home: Path, name: str, registry: str, ref: str, *flags: str) -> tuple[float | None, float]:
    """Run ``cache create --wait``; (seconds until FlashReady was printed, seconds to the end)."""
    started = time.perf_counter()
    proc = subprocess.Popen(_imc(home, "cache", "create", name, "--wait", "--image", f"{registry}/{ref}",
                                 "--plain-http", registry, *flags), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    usable = None
    for line in proc.stderr:
        if usable is None and "[FlashReady]" in line:
            usable = time.perf_counter() - started
    if proc.wait() != 0:
        raise RuntimeError(f"cache create {name} failed")
    return usable, time.perf_counter() - started


def flash(endpoints: dict[str, Any], work: Path, table: Table, rounds: int = 3) -> None:
    registry = endpoints["plain"].host
    pulls, usable, complete = [], [], []
    for _ in range(rounds):
        pulls.append(run_measured(_imc(fresh_dir(work / "flash-pull"), "pull", "-q", "--plain-http", registry,
                                       f"{registry}/{LARGE}")).seconds)
        u, c = _timed_create(fresh_dir(work / "flash-home"), "flash", registry, LARGE, "--flash")
        assert u is not None, "no FlashReady line"
        usable.append(u)
        complete.append(c)
    pull, use, done = (sorted(x)[len(x) // 2] for x in (pulls, usable, complete))
    table.add("flash: large image usable (FlashReady) vs bare imc pull", f"{use:.2f} s usable, {done:.2f} s packed",
              f"{pull:.2f} s (imc pull)", f"**{use / pull:.2f}x** of a bare pull (target ≤ 1.10x)")


def _push_sibling(endpoint: Any, catalogue: dict[str, Any], work: Path) -> int:
    """The large image with its last layer swapped for a new one; returns the new bytes."""
    large = catalogue["images"][LARGE]["manifests"][0]
    layer = imagegen.gzip_bytes(random.Random(7).randbytes(NEW_LAYER_BYTES), level=1)
    path = work / "sibling-layer"
    path.write_bytes(layer)
    digest = imagegen.sha256_digest(layer)
    layers = [*large["layers"][:-1], {"mediaType": imagegen.OCI_LAYER_GZIP, "digest": digest, "size": len(layer)}]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in layers]}}).encode()
    (work / "sibling-config").write_bytes(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": imagegen.OCI_MANIFEST,
                           "config": {"mediaType": imagegen.OCI_CONFIG, "digest": imagegen.sha256_digest(config),
                                      "size": len(config)},
                           "layers": [{k: x[k] for k in ("mediaType", "digest", "size")} for x in layers]}).encode()
    repo, tag = SIBLING.split(":")
    client = imagegen.RegistryClient(endpoint.host, endpoint.scheme)
    client.push_blob(repo, digest, len(layer), path)
    client.push_blob(repo, imagegen.sha256_digest(config), len(config), work / "sibling-config")
    for x in layers[:-1]:
        client.push_blob(repo, x["digest"], x["size"], Path(catalogue["blobStore"]) / "blobs" / "sha256" /
                         x["digest"].split(":")[1])
    client.put_manifest(repo, tag, manifest, imagegen.OCI_MANIFEST)
    return len(layer) + len(config)


def reuse(endpoints: dict[str, Any], catalogue: dict[str, Any], work: Path, table: Table) -> None:
    registry = endpoints["plain"].host
    new_bytes = _push_sibling(endpoints["plain"], catalogue, work)
    home = fresh_dir(work / "reuse-home")
    _, cold = _timed_create(home, "first", registry, LARGE)
    subprocess.run(_imc(home, "gc"), check=True, capture_output=True)  # staging reclaimed: only the volume holds it
    _, warm = _timed_create(home, "second", registry, SIBLING, "--reuse")
    status = json.loads(subprocess.run(_imc(home, "cache", "get", "second", "-o", "json"), check=True,
                                       capture_output=True, text=True).stdout)["status"]
    large = catalogue["images"][LARGE]["manifests"][0]
    total = large["config"]["size"] + sum(x["size"] for x in large["layers"])
    share = new_bytes / total
    table.add("reuse: second cache sharing 6 of 7 layers, bytes fetched", f"{status['bytesFetched']} B",
              f"{new_bytes} B (the new layer and config)",
              "exact" if status["bytesFetched"] == new_bytes else "**MISMATCH**")
    table.add("reuse: second cache build time", f"{warm:.2f} s", f"{cold:.2f} s cold; new bytes' share "
              f"{share:.0%} → {share * cold:.2f} s", f"**{warm / cold:.2f}x** of cold (target ≤ {share + 0.2:.2f}x)")

