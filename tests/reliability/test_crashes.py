"""``kill -9`` of a real imc process at each stage of a cache build and of gc, then what
the next process sees; and a disk that fills up mid-build.

A process is stopped at a stage deterministically, never by sleeping: with
``IMC_TEST_PAUSE_AT=<stage>`` the library's test hook (``builder/faults.py``) writes
the stage to ``IMC_TEST_PAUSE_FILE`` and blocks there, holding its locks and files;
the test waits for that file (bounded), then sends SIGKILL. Mid-download, a counting
proxy holds the registry's response instead.

After every crash: ``imc layers verify`` passes; ``imc cache get`` shows the cache
Ready (what was finished stays finished) or Failed / UpdateFailed saying the build
process ended; the operation can be retried and reaches Ready; and after ``imc gc``
nothing is orphaned: no partial download or volume, no volume file that no record
points at, no lock file of a cache that no longer exists.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import imagegen
import pytest
from support.countproxy import CountingProxy
from support.imccli import (
    DEADLINE,
    ENDED,
    assert_no_orphans,
    assert_ready_with_volume,
    assert_store_verifies,
    cache,
    create_args,
    kill9,
    ok,
    run_imc,
    start,
    start_paused,
)


def assert_failed_by_the_crash(obj: dict[str, Any], phase: str = "Failed") -> None:
    status = obj["status"]
    assert status["phase"] == phase, status
    assert ENDED in status["message"]
    assert status["events"][-1]["type"] == "Warning" and ENDED in status["events"][-1]["message"]


def retry_create(home: Path, name: str, args: list[str]) -> dict[str, Any]:
    ok(home, "cache", "delete", name)
    ok(home, *args)
    return assert_ready_with_volume(home, name)


# -- a build killed at each stage ------------------------------------------------------------------------


def test_killed_while_pulling_resumes_the_download_on_retry(tmp_path: Path, plain_registry: Any,
                                                             catalogue: dict[str, Any]) -> None:
    home = tmp_path / "home"
    victim = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]["layers"][0]
    host, port = plain_registry.host.split(":")
    with CountingProxy((host, int(port))) as proxy:
        pause = proxy.pause_response(lambda m, p: m == "GET" and p.endswith(f"/blobs/{victim['digest']}"),
                                     after=150_000)
        args = create_args(proxy.host, "c", "fixtures/app:1.0")
        partial = home / "ingest" / f"sha256-{victim['digest'][7:]}.partial"
        proc = start(home, *args)
        try:
            assert pause.reached.wait(DEADLINE), "the download never reached the held layer"
            # The bytes before the pause reach the partial file (polled, with a deadline).
            deadline = time.monotonic() + DEADLINE
            while not (partial.exists() and partial.stat().st_size >= 140_000):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
        finally:
            kill9(proc)
            pause.release()
        held = partial.stat().st_size
        assert 0 < held < victim["size"]  # killed mid-blob: a partial download
        assert_store_verifies(home)
        assert_failed_by_the_crash(cache(home, "c"))
        retry_create(home, "c", args)
        gets = proxy.blob_gets()[victim["digest"]]
    # The retry went on from the partial the killed process left, not from byte 0.
    assert len(gets) == 2 and "range" not in gets[0].headers and gets[1].headers["range"] == f"bytes={held}-"
    assert_no_orphans(home)


@pytest.mark.parametrize("stage", ["pulled", "packing", "pack-midway"])
def test_create_killed_at_a_stage_fails_cleanly_and_can_be_retried(tmp_path: Path, plain_registry: Any,
                                                                  stage: str) -> None:
    home = tmp_path / "home"
    args = create_args(plain_registry.host, "c", "fixtures/app:1.0")
    kill9(start_paused(home, tmp_path, stage, *args))
    if stage == "pack-midway":
        assert [p.name for p in (home / "volumes").iterdir() if p.name.endswith(".imcv.partial")]
    assert_store_verifies(home)
    assert_failed_by_the_crash(cache(home, "c"))
    retry_create(home, "c", args)
    assert_no_orphans(home)


def test_flash_killed_after_flash_ready_stays_ready_from_staging(tmp_path: Path, plain_registry: Any,
                                                                 catalogue: dict[str, Any]) -> None:
    home = tmp_path / "home"
    args = create_args(plain_registry.host, "c", "fixtures/app:1.0", flash=True)
    kill9(start_paused(home, tmp_path, "flash-ready", *args))
    assert_store_verifies(home)
    status = cache(home, "c")["status"]
    assert status["phase"] == "Ready" and status["source"] == "staging", status
    assert status["volume"]["state"] == "failed" and ENDED in status["events"][-1]["message"]
    # gc keeps the staging copy the cache is served from.
    assert_no_orphans(home)
    blobs = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]
    for blob in (blobs["config"], *blobs["layers"]):
        assert (home / "store" / "blobs" / "sha256" / blob["digest"][7:]).is_file()
    assert cache(home, "c")["status"]["source"] == "staging"
    retry_create(home, "c", args)
    assert_no_orphans(home)


def test_update_killed_after_the_switch_keeps_the_new_volume(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    ok(home, *create_args(plain_registry.host, "c", "fixtures/app:1.0"))
    first = assert_ready_with_volume(home, "c")["status"]["volume"]["path"]
    kill9(start_paused(home, tmp_path, "switched", "cache", "update", "c", "--wait", "-q",
                       "--image", f"{plain_registry.host}/fixtures/app:2.0"))
    assert_store_verifies(home)
    obj = assert_ready_with_volume(home, "c")
    assert obj["status"]["volume"]["path"] != first and Path(first).exists()  # the old one, not yet removed
    assert [i["name"] for i in obj["status"]["images"]] == [f"{plain_registry.host}/fixtures/app:2.0"]
    assert_no_orphans(home)
    assert not Path(first).exists()


def test_update_killed_mid_pack_keeps_serving_the_old_volume_and_retries(tmp_path: Path,
                                                                          plain_registry: Any) -> None:
    home = tmp_path / "home"
    ok(home, *create_args(plain_registry.host, "c", "fixtures/app:1.0"))
    first = assert_ready_with_volume(home, "c")["status"]["volume"]["path"]
    kill9(start_paused(home, tmp_path, "pack-midway", "cache", "update", "c", "--wait", "-q",
                       "--image", f"{plain_registry.host}/fixtures/app:2.0"))
    assert_store_verifies(home)
    obj = cache(home, "c")
    assert_failed_by_the_crash(obj, "UpdateFailed")
    assert obj["status"]["source"] == "volume" and obj["status"]["volume"]["path"] == first
    ok(home, "volume", "verify", "c")  # the previous volume still serves
    ok(home, "cache", "update", "c", "--wait", "-q")  # UpdateFailed: the same images again
    obj = assert_ready_with_volume(home, "c")
    assert [i["name"] for i in obj["status"]["images"]] == [f"{plain_registry.host}/fixtures/app:2.0"]
    assert_no_orphans(home)


def test_gc_killed_holding_its_lock_blocks_nothing_afterwards(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    ok(home, *create_args(plain_registry.host, "a", "fixtures/app:1.0"))
    ok(home, *create_args(plain_registry.host, "b", "fixtures/app:2.0"))
    ok(home, "cache", "delete", "a")
    gc = start_paused(home, tmp_path, "gc-locked", "gc")
    build = start(home, *create_args(plain_registry.host, "d", "fixtures/base:1.0"))
    try:
        deadline = time.monotonic() + DEADLINE
        while not any(e["reason"] == "Pulling" for e in _events(home, "d")):  # observable, with a deadline
            assert time.monotonic() < deadline and build.poll() is None, build.stderr
            time.sleep(0.02)
        assert build.poll() is None  # the build waits for gc's lock to pull
    finally:
        kill9(gc)
    _, err = build.communicate(timeout=120)
    assert build.returncode == 0, err
    assert_store_verifies(home)
    assert_ready_with_volume(home, "b")
    assert_ready_with_volume(home, "d")
    assert_no_orphans(home)
    assert [p for p in (home / "store" / "blobs" / "sha256").iterdir()] == []  # every cache is packed


def _events(home: Path, name: str) -> list[dict[str, Any]]:
    out = run_imc(home, "cache", "events", name, "-o", "json")
    return json.loads(out.stdout) if out.returncode == 0 else []


# -- the disk fills up ---------------------------------------------------------------------------------


def _push_image(endpoint: Any, repository: str, tag: str, layers: list[bytes]) -> str:
    """Push an OCI image with these gzip layers to the registry; its reference."""
    digests = [imagegen.sha256_digest(data) for data in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": digests}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": imagegen.OCI_MANIFEST,
        "config": {"mediaType": imagegen.OCI_CONFIG, "digest": imagegen.sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": imagegen.OCI_LAYER_GZIP, "digest": d, "size": len(data)}
                   for d, data in zip(digests, layers, strict=True)],
    }).encode()
    client = imagegen.RegistryClient(endpoint.host, endpoint.scheme)
    with tempfile.TemporaryDirectory() as tmp:
        for data in (*layers, config):
            path = Path(tmp) / "blob"
            path.write_bytes(data)
            client.push_blob(repository, imagegen.sha256_digest(data), len(data), path)
    client.put_manifest(repository, tag, manifest, imagegen.OCI_MANIFEST)
    return f"{repository}:{tag}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 3 MiB tmpfs (we run as root in CI); unmounted after the test, whatever happens."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=False, capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("layer_mib,where", [(4.0, "pulling"), (1.7, "packing")])
def test_disk_full_fails_the_build_clearly_and_leaves_no_partials(small_disk: Path, plain_registry: Any,
                                                                  layer_mib: float, where: str) -> None:
    """The layer does not fit the disk (pulling), or fits but its volume does not (packing)."""
    data = random.Random(int(layer_mib * 10)).randbytes(int(layer_mib * 2**20))
    ref = _push_image(plain_registry, "fixtures/diskfull", where, [gzip.compress(data, compresslevel=1, mtime=0)])
    home = small_disk
    out = run_imc(home, *create_args(plain_registry.host, "big", ref))
    assert out.returncode == 12, out.stderr  # the cache ended Failed
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    status = cache(home, "big")["status"]
    assert status["phase"] == "Failed" and "no space left" in status["message"].lower(), status
    assert_store_verifies(home)
    assert_no_orphans(home)
    assert list((home / "volumes").iterdir()) == []
