"""Many cache builds at once, in separate processes, sharing layers, with gc running
alongside; and the races between gc and a build that a loop can only hit by luck,
made deterministic.

Overlap is arranged, not hoped for: a counting proxy in front of the real registry
holds every manifest request until each of the six builds has sent its first one.
A build sends it from inside ``store.pinning()`` (the shared side of gc's lock), so at
that moment all six are inside, none has fetched a blob, and no gc can remove a blob
until every one of them has recorded what it pins. Each shared layer is then fetched
from the registry exactly once, which the proxy counts per digest.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from support.countproxy import CountingProxy
from support.imccli import (
    assert_no_orphans,
    assert_ready_with_volume,
    create_args,
    run_imc,
    start,
)

from builder.build import Builder
from builder.caches import Caches
from builder.imagecache import CacheSpec
from builder.oci import Platform

BUILDS = {
    "app-one": ["fixtures/app:1.0"],
    "app-two": ["fixtures/app:2.0"],
    "base-other": ["fixtures/base:1.0", "team/other:1.0"],
    "oci": ["fixtures/oci-app:1.0"],
    "docker-multi": ["fixtures/docker-multi:1.0"],
    "multi-app": ["fixtures/multi:1.0", "fixtures/app:1.0"],
}
GC_RUNS = 20
BAD_OUTPUT = ("database is locked", "Traceback")


def blobs_of(catalogue: dict[str, Any], ref: str) -> list[str]:
    """The config and layer digests of ``ref`` for this machine's platform."""
    host = Platform.host()
    for m in catalogue["images"][ref]["manifests"]:
        p = m.get("platform") or {}
        if (p.get("os"), p.get("architecture")) == (host.os, host.architecture):
            return [m["config"]["digest"], *(layer["digest"] for layer in m["layers"])]
    raise AssertionError(f"{ref} has no manifest for {host}")


def test_six_overlapping_builds_fetch_each_shared_layer_once_while_gc_runs(
        tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    home = tmp_path / "home"  # not created: six processes make the store and database at once
    needed = {name: {d for ref in refs for d in blobs_of(catalogue, ref)} for name, refs in BUILDS.items()}
    shared = {d for d in set().union(*needed.values()) if sum(d in n for n in needed.values()) > 1}
    assert len(shared) >= 3  # the base layers, shared across repositories and media types
    host, port = plain_registry.host.split(":")
    gc_results: list[Any] = []

    def gc_loop() -> None:
        for _ in range(GC_RUNS):
            gc_results.append(run_imc(home, "gc", "-o", "json"))

    with CountingProxy((host, int(port))) as proxy:
        gate = proxy.hold(lambda method, path: "/manifests/" in path)
        builds = {name: start(home, *create_args(proxy.host, name, *refs)) for name, refs in BUILDS.items()}
        gc_thread = threading.Thread(target=gc_loop)
        gc_thread.start()
        try:
            assert gate.wait_for(len(BUILDS), 60), f"only {gate.waiting} of {len(BUILDS)} builds started"
            held = gate.waiting
            fetched_before = proxy.blob_gets()
        finally:
            gate.open()
            outputs = {name: proc.communicate(timeout=120) for name, proc in builds.items()}
            gc_thread.join(300)
        gets = proxy.blob_gets()
    assert held == len(BUILDS) and fetched_before == {}

    for name, proc in builds.items():
        _, err = outputs[name]
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{err}"
        assert not any(bad in err for bad in BAD_OUTPUT), err
    assert not gc_thread.is_alive() and len(gc_results) == GC_RUNS
    for run in gc_results:
        assert run.returncode == 0 and not any(bad in run.stderr for bad in BAD_OUTPUT), run.stderr
        json.loads(run.stdout)

    # Every blob any build needed came from the registry exactly once.
    assert {d: len(r) for d, r in gets.items()} == {d: 1 for d in set().union(*needed.values())}
    # And exactly one build says it fetched each; the others found it in the store.
    fetched_by: dict[str, list[str]] = {}
    for name in BUILDS:
        obj = assert_ready_with_volume(home, name)
        for event in obj["status"]["events"]:
            if event["reason"] == "LayerFetched":
                fetched_by.setdefault(event["message"].split()[1], []).append(name)
        reused = {e["message"].split()[1] for e in obj["status"]["events"] if e["reason"] == "LayerReused"}
        assert reused | {d for d, who in fetched_by.items() if name in who} == needed[name]
    assert {d: len(who) for d, who in fetched_by.items()} == {d: 1 for d in set().union(*needed.values())}
    assert_no_orphans(home)


# -- gc against a build, at the exact moment that matters -----------------------------------------------------


def _armed_after_store_gc(caches: Caches, monkeypatch: Any, action: Any) -> None:
    """Run ``action`` once, inside ``caches.gc()``, right after gc has read the cache
    records for its sweep of volumes and lock files (the first read after store gc)."""
    real_gc, real_list = caches.store.gc, caches._db.list
    state = {"armed": False, "done": False}

    def store_gc(*args: Any, **kw: Any) -> Any:
        report = real_gc(*args, **kw)
        state["armed"] = True
        return report

    def db_list() -> Any:
        records = real_list()
        if state["armed"] and not state["done"]:
            state["done"] = True
            action()
        return records

    monkeypatch.setattr(caches.store, "gc", store_gc)
    monkeypatch.setattr(caches._db, "list", db_list)


def test_gc_keeps_the_volume_of_a_build_that_finishes_while_gc_sweeps(
        tmp_path: Path, plain_registry: Any, monkeypatch: Any) -> None:
    caches = Caches(tmp_path)
    spec = CacheSpec(images=[f"{plain_registry.host}/fixtures/base:1.0"], plain_http=[plain_registry.host])
    _, lease = caches.create("late", spec)
    finished: list[Any] = []
    # gc reads the records while "late" is still building; the build then completes
    # (volume renamed into place, record switched, lease released) before gc sweeps.
    _armed_after_store_gc(caches, monkeypatch, lambda: finished.append(Builder(caches).build("late", lease)))
    caches.gc()
    assert finished and finished[0].phase == "Ready", finished
    monkeypatch.undo()
    assert Path(finished[0].volume.path).exists(), "gc removed the volume of a Ready cache"
    assert Caches(tmp_path).get("late").source == "volume"


def test_gc_does_not_remove_the_lease_of_a_cache_being_created(
        tmp_path: Path, plain_registry: Any, monkeypatch: Any) -> None:
    caches = Caches(tmp_path)
    spec = CacheSpec(images=[f"{plain_registry.host}/fixtures/base:1.0"], plain_http=[plain_registry.host])
    created: list[Any] = []
    # A cache is created (lease file locked, record inserted) after gc read the records.
    _armed_after_store_gc(caches, monkeypatch, lambda: created.append(caches.create("new", spec)))
    caches.gc()
    monkeypatch.undo()
    _, lease = created[0]
    try:
        # Its builder (this test, holding the lease) is alive: another process must see it
        # building, not conclude from a fresh lock file that the builder died.
        assert Caches(tmp_path).get("new").phase == "Creating"
    finally:
        result = Builder(caches).build("new", lease)
    assert result.phase == "Ready", result.message
