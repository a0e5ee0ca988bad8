"""Pull benchmarks: imc against skopeo on two large images, shared-base bytes, memory.

- Throughput: ``imc pull`` into an empty store against ``skopeo copy docker://… oci:…``
  into an empty directory, the same image from registry:2, over plain HTTP and over
  TLS (verified with the throwaway CA on both sides). Two images: the generated large
  fixture, and one of real files from this machine (libraries, Python, shared data, a
  Java runtime, jars; gzip -6), whose content compresses and hashes as images do.
  Each row also gives the median CPU time (user and system), which a machine shared
  with other work does not distort as it does wall time.
- Shared base: after ``fixtures/app:1.0``, pulling ``fixtures/app:2.0`` must fetch
  exactly the bytes of the blobs the store does not hold yet.
- Memory: peak RSS while pulling an image with a single 1 GiB layer, beside skopeo's.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import imagegen
from harness import IMC, Run, Table, fresh_dir, mb, run_measured, side_by_side

ROUNDS = 5
HUGE_REPO = "bench/huge"
HUGE_LAYER_BYTES = 1 << 30


def _imc_pull(home: Path, endpoint: Any, ref: str) -> list[str]:
    transport = ["--plain-http", endpoint.host] if endpoint.scheme == "http" else ["--ca-file", endpoint.ca_file]
    return [*IMC, "--home", str(home), "pull", "-q", *transport, f"{endpoint.host}/{ref}"]


def _skopeo_copy(dest: Path, endpoint: Any, ref: str, certs: Path) -> list[str]:
    transport = ["--src-tls-verify=false"] if endpoint.scheme == "http" else ["--src-cert-dir", str(certs)]
    return ["skopeo", "copy", "-q", *transport, f"docker://{endpoint.host}/{ref}", f"oci:{dest}:bench"]


def throughput(endpoints: dict[str, Any], catalogue: dict[str, Any], work: Path, table: Table) -> None:
    plain = endpoints["plain"]
    print("  building (once, cached) and pushing the real-file image...", flush=True)
    real = imagegen.push_real_files(plain.host, plain.scheme, plain.ca_file)
    images = [("generated", "fixtures/large:1.0", catalogue["images"]["fixtures/large:1.0"]),
              ("real files", imagegen.REAL_FILES_REF, real)]
    certs = fresh_dir(work / "certs")
    shutil.copy(endpoints["tls"].ca_file, certs / "ca.crt")
    home, dest = work / "imc-home", work / "skopeo-oci"
    for label, ref, entry in images:
        manifest = entry["manifests"][0]
        size = manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
        for mode in ("plain", "tls"):
            ep = endpoints[mode]
            result = side_by_side(
                f"pull {label} {mode}", ROUNDS,
                imc=lambda ep=ep, ref=ref: run_measured(_imc_pull(home, ep, ref)),
                peer=lambda ep=ep, ref=ref: run_measured(_skopeo_copy(dest, ep, ref, certs)),
                reset=lambda: (fresh_dir(home), shutil.rmtree(dest, ignore_errors=True)),
            )
            imc_rate = size / result.imc_median
            peer_rate = size / result.peer_median
            table.add(f"pull {mb(size)} of {label} ({len(manifest['layers'])} layers) over "
                      f"{'TLS' if mode == 'tls' else 'plain HTTP'}",
                      f"{imc_rate / 1e6:.0f} MB/s ({result.imc_median:.2f} s; {result.imc_cpu_median:.2f} s CPU)",
                      f"{peer_rate / 1e6:.0f} MB/s ({result.peer_median:.2f} s; {result.peer_cpu_median:.2f} s CPU)",
                      f"**{imc_rate / peer_rate:.2f}x** throughput (target ≥ 2.0x)")


def shared_base(endpoints: dict[str, Any], catalogue: dict[str, Any], work: Path, table: Table) -> None:
    ep = endpoints["plain"]
    home = fresh_dir(work / "imc-shared")
    first = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]
    second = catalogue["images"]["fixtures/app:2.0"]["manifests"][0]
    held = {first["config"]["digest"], *(layer["digest"] for layer in first["layers"])}
    blobs = [second["config"], *second["layers"]]
    expected = sum(b["size"] for b in blobs if b["digest"] not in held)
    subprocess.run(_imc_pull(home, ep, "fixtures/app:1.0"), check=True, capture_output=True)
    out = subprocess.run([*_imc_pull(home, ep, "fixtures/app:2.0"), "-o", "json"], check=True,
                         capture_output=True, text=True)
    fetched = json.loads(out.stdout)["bytesFetched"]
    table.add("second image sharing its base: bytes fetched", f"{fetched} B",
              f"{expected} B (the new blobs)", "exact" if fetched == expected else "**MISMATCH**")


def _push_huge(endpoint: Any, work: Path) -> str:
    """An image with one 1 GiB uncompressed layer, generated and pushed once."""
    blobs = fresh_dir(work / "huge-blobs")
    layer_path = blobs / "layer.tar"
    rng = random.Random(1)
    chunk = rng.randbytes(8 << 20)
    h = hashlib.sha256()
    with layer_path.open("wb") as f:
        for i in range(HUGE_LAYER_BYTES // len(chunk)):
            block = i.to_bytes(8, "big") + chunk[8:]
            h.update(block)
            f.write(block)
    layer_digest = f"sha256:{h.hexdigest()}"
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}).encode()
    config_digest = imagegen.sha256_digest(config)
    (blobs / "config.json").write_bytes(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": imagegen.OCI_MANIFEST,
        "config": {"mediaType": imagegen.OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": imagegen.OCI_LAYER_TAR, "digest": layer_digest, "size": HUGE_LAYER_BYTES}],
    }).encode()
    client = imagegen.RegistryClient(endpoint.host, endpoint.scheme, endpoint.ca_file)
    client.push_blob(HUGE_REPO, layer_digest, HUGE_LAYER_BYTES, layer_path)
    client.push_blob(HUGE_REPO, config_digest, len(config), blobs / "config.json")
    client.put_manifest(HUGE_REPO, "1.0", manifest, imagegen.OCI_MANIFEST)
    shutil.rmtree(blobs)
    return f"{HUGE_REPO}:1.0"


def memory(endpoints: dict[str, Any], work: Path, table: Table) -> None:
    ep = endpoints["plain"]
    ref = _push_huge(ep, work)
    home, dest = fresh_dir(work / "imc-huge"), work / "skopeo-huge"
    imc_run: Run = run_measured(_imc_pull(home, ep, ref))
    shutil.rmtree(home)
    shutil.rmtree(dest, ignore_errors=True)
    peer_run: Run = run_measured(_skopeo_copy(dest, ep, ref, work))
    shutil.rmtree(dest, ignore_errors=True)
    table.add("peak memory pulling a 1 GiB layer", f"{imc_run.max_rss_bytes / 2**20:.0f} MiB",
              f"{peer_run.max_rss_bytes / 2**20:.0f} MiB",
              f"{imc_run.max_rss_bytes / peer_run.max_rss_bytes:.2f}x memory (target: under 150 MiB)")
