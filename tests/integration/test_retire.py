"""Retiring caches by use, against real registry:2 and real pulls.

``imc serve`` counts each cache's hits and writes them in batches (``lastUsedTime``,
``hitCount``), at most once a minute per cache and on shutdown, so they survive a
restart; automatic caches expire ``auto_unused_days`` after their last use and stay
within ``auto_max_bytes``, the least recently used going first but never one used
within the hour; ``imc gc --dry-run`` deletes nothing; a manual cache in use near the
end of its retention is warned once. A settable clock is injected where time matters.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.clock import Clock
from support.imccli import imc_env, ok, run_imc

from builder.build import Builder
from builder.caches import Caches
from builder.errors import NotFoundLocalError
from builder.home import Home
from builder.imagecache import CacheSpec, ImageCache, Settings, parse_time, rfc3339
from builder.retirement import BUDGET, EXPIRING_SOON, UNUSED
from builder.server.app import Server
from builder.server.hits import Hits

IMAGE = "fixtures/base:1.0"


def build(caches: Caches, name: str, registry: Any, image: str = IMAGE, **kw: Any) -> ImageCache:
    spec = CacheSpec(images=[f"{registry.host}/{image}"], plain_http=[registry.host], **kw)
    _, lease = caches.create(name, spec, auto=name.startswith("auto-"), instance_id=name.removeprefix("auto-"))
    result = Builder(caches).build(name, lease)
    assert result.phase == "Ready", result.message
    return result


def skopeo_copy(address: str, ref: str, dest: Path) -> None:
    out = subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{address}/{ref}",
                          f"dir:{dest}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def cache_hits_metric(server: Server, cache: str) -> int:
    """What /metrics counts as requests answered by ``cache``: the same events as hitCount."""
    text = server.metrics.render()[0].decode()
    return sum(int(s.value) for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "imc_cache_hits_total" and s.labels.get("cache") == cache)


def row(home: Path, name: str) -> dict[str, Any] | None:
    """A record straight from the database, past every check."""
    with sqlite3.connect(Home(home).records) as db:
        found = db.execute("SELECT doc FROM caches WHERE name=?", (name,)).fetchone()
    return json.loads(found[0]) if found else None


# -- hits ------------------------------------------------------------------------------------


def test_hits_are_written_at_most_once_a_minute_per_cache_and_all_on_shutdown(tmp_path: Path,
                                                                              plain_registry: Any) -> None:
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    build(caches, "web", plain_registry)
    before = caches.get("web")
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0, hits_flush_interval=0).start()
    try:
        skopeo_copy(server.address, IMAGE, tmp_path / "a")
        served = cache_hits_metric(server, "web")
        assert served == 4  # the manifest, the config, two layers
        assert server.hits.pending() == {"web": served}
        assert row(tmp_path, "web")["hit_count"] == 0  # counted in memory only, so far

        assert server.hits.flush() == 1  # the cache's first hits are due at once
        first = caches.get("web")
        assert first.hit_count == served and first.last_used == rfc3339(clock.now)
        # A status write: resourceVersion moves (watchers see it), the spec's generation does not.
        assert first.resource_version > before.resource_version
        assert first.to_object()["metadata"]["generation"] == before.to_object()["metadata"]["generation"]

        # Another cache, with app:1.0 (base's two layers and its own): the layers both
        # caches hold count for neither, the rest for the cache that answered.
        build(caches, "zapp", plain_registry, image="fixtures/app:1.0")
        clock.now += dt.timedelta(seconds=30)
        skopeo_copy(server.address, "fixtures/app:1.0", tmp_path / "b")
        assert server.hits.pending() == {"zapp": 3}  # the manifest, the config, its own layer
        skopeo_copy(server.address, IMAGE, tmp_path / "c")
        assert server.hits.pending() == {"zapp": 3, "web": 2}  # the manifest, the config
        assert server.hits.flush() == 1  # zapp's first hits; web's wait for their minute
        assert caches.get("zapp").hit_count == 3
        assert caches.get("web").hit_count == served
        assert server.hits.pending() == {"web": 2}

        clock.now += dt.timedelta(seconds=30)
        assert server.hits.flush() == 1
        assert caches.get("web").hit_count == served + 2
        assert caches.get("web").last_used == rfc3339(clock.now - dt.timedelta(seconds=30))  # the last hit's time

        clock.now += dt.timedelta(seconds=1)
        skopeo_copy(server.address, IMAGE, tmp_path / "d")
        assert server.hits.pending() == {"web": 2}
    finally:
        server.stop()  # writes what is still counted, minute or not
    web = caches.get("web")
    assert web.hit_count == served + 4 and web.last_used == rfc3339(clock.now)
    assert server.hits.pending() == {}


def test_imc_serve_hits_survive_a_restart_and_add_up(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    build(Caches(home), "web", plain_registry)
    totals = []
    for run in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "builder", "serve", "--listen", "127.0.0.1:0",
                                 "--sweep-interval", "0", "--log-level", "warning"],
                                stderr=subprocess.PIPE, text=True, env=imc_env(home))
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()
            assert "serving on http://" in first, first
            address = first.split("serving on http://")[1].split()[0]
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            skopeo_copy(address, IMAGE, tmp_path / f"pull-{run}")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        got = json.loads(ok(home, "cache", "get", "web", "-o", "json").stdout)
        totals.append(got["status"]["hitCount"])
        assert parse_time(got["status"]["lastUsedTime"]) is not None
    assert totals[0] >= 3 and totals[1] == 2 * totals[0]  # the same pull again: as many hits again

    table = ok(home, "cache", "list", "-o", "wide").stdout.splitlines()
    assert table[0].split()[-2:] == ["LAST-USED", "HITS"]
    assert table[1].split()[0] == "web" and table[1].split()[-1] == str(totals[1])
    got = ok(home, "cache", "get", "web").stdout.splitlines()
    assert got[0].split()[-2:] == ["LAST-USED", "HITS"] and got[1].split()[-1] == str(totals[1])
    assert "LAST-USED" not in ok(home, "cache", "list").stdout  # the narrow table


def test_hits_of_a_deleted_cache_are_dropped(tmp_path: Path, plain_registry: Any) -> None:
    caches = Caches(tmp_path)
    build(caches, "web", plain_registry)
    hits = Hits(caches)
    hits.hit("web")
    caches.delete("web")
    assert hits.flush() == 0 and hits.pending() == {}


# -- expiry by last use ------------------------------------------------------------------------


def test_an_automatic_cache_served_by_imc_serve_expires_after_its_last_hit(tmp_path: Path,
                                                                           plain_registry: Any) -> None:
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    Settings(auto_unused_days=3).save(Home(tmp_path).settings)
    auto = build(caches, "auto-eci-1", plain_registry)
    assert caches.get(auto.name).expire == rfc3339(clock.now + dt.timedelta(days=3))  # never used: from creation
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0, hits_flush_interval=0).start()
    try:
        clock.now += dt.timedelta(days=2)
        skopeo_copy(server.address, IMAGE, tmp_path / "pull")
        used = clock.now
        clock.now += dt.timedelta(seconds=20)
        server.hits.flush()
    finally:
        server.stop()
    got = caches.get(auto.name)
    assert got.last_used == rfc3339(used) and got.expire == rfc3339(used + dt.timedelta(days=3))
    clock.now = used + dt.timedelta(days=3) - dt.timedelta(seconds=1)
    assert [c.name for c in caches.list()] == [auto.name]  # past creation + 3 days: kept, it was used
    clock.now += dt.timedelta(seconds=1)
    assert caches.list() == [] and row(tmp_path, auto.name) is None


def test_a_late_batch_counts_by_the_time_of_its_hits(tmp_path: Path, plain_registry: Any) -> None:
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    Settings(auto_unused_days=1).save(Home(tmp_path).settings)
    build(caches, "auto-eci-1", plain_registry)
    clock.now += dt.timedelta(hours=5)
    matched = clock.now
    caches.take("auto-eci-1")  # a match: a use, now
    caches.mark_used("auto-eci-1", 4, matched - dt.timedelta(minutes=1))  # hits served a minute earlier
    got = caches.get("auto-eci-1")
    assert got.last_used == rfc3339(matched) and got.hit_count == 4  # the last use does not move back

    # A hit five seconds before the expiry, written ten seconds after it: the cache was
    # in use, so it lives on from that hit.
    hit = matched + dt.timedelta(days=1) - dt.timedelta(seconds=5)
    clock.now = matched + dt.timedelta(days=1, seconds=10)
    assert caches.mark_used("auto-eci-1", 1, hit).last_used == rfc3339(hit)
    assert [c.name for c in caches.list()] == ["auto-eci-1"]

    # A hit recorded as made after the expiry does not revive it: it is deleted.
    clock.now = hit + dt.timedelta(days=2)
    with pytest.raises(NotFoundLocalError):
        caches.mark_used("auto-eci-1", 1, hit + dt.timedelta(days=1, seconds=1))
    assert row(tmp_path, "auto-eci-1") is None


# -- the byte budget --------------------------------------------------------------------------


def three_automatic_caches(tmp_path: Path, registry: Any, clock: Clock) -> tuple[Caches, dict[str, int]]:
    """auto-a (never used), auto-b (used now), auto-c (used two hours ago), all made
    three hours ago; and the bytes each one's volume holds."""
    caches = Caches(tmp_path, clock=clock)
    sizes = {c.name: c.volume.content_bytes for c in (build(caches, f"auto-{x}", registry) for x in "abc")}
    clock.now += dt.timedelta(hours=1)
    caches.mark_used("auto-c")
    clock.now += dt.timedelta(hours=2)
    caches.mark_used("auto-b")
    return caches, sizes


def test_over_the_budget_the_least_recently_used_automatic_caches_go_first(tmp_path: Path, plain_registry: Any,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    caches, sizes = three_automatic_caches(tmp_path, plain_registry, clock)
    manual = build(caches, "manual", plain_registry)  # never counted, never taken
    Settings(auto_max_bytes=sizes["auto-b"] + sizes["auto-c"]).save(Home(tmp_path).settings)
    caplog.set_level(logging.INFO, logger="builder")
    report = caches.gc()
    assert [(r.name, r.cause) for r in report.retired] == [("auto-a", BUDGET)]
    assert sorted(c.name for c in caches.list()) == ["auto-b", "auto-c", "manual"]
    assert not Home(tmp_path).volumes_of(report.retired[0].id)
    assert any(r.getMessage().startswith("automatic image cache auto-a (") and "over auto_max_bytes" in r.getMessage()
               and "least recently used" in r.getMessage() for r in caplog.records)

    # A budget nothing meets: auto-c goes, auto-b (used within the hour) stays, over budget.
    Settings(auto_max_bytes=1).save(Home(tmp_path).settings)
    report = caches.gc()
    assert [r.name for r in report.retired] == ["auto-c"] and report.auto_bytes == sizes["auto-b"]
    assert sorted(c.name for c in caches.list()) == ["auto-b", "manual"]
    assert any(r.levelname == "WARNING" and "used within the last hour" in r.getMessage() for r in caplog.records)
    clock.now += dt.timedelta(hours=1)
    assert [r.name for r in caches.gc().retired] == ["auto-b"]
    assert [c.name for c in caches.list()] == [manual.name]


def test_an_automatic_build_past_the_budget_deletes_the_least_recently_used(tmp_path: Path,
                                                                           plain_registry: Any) -> None:
    clock = Clock()
    caches, sizes = three_automatic_caches(tmp_path, plain_registry, clock)
    Settings(auto_max_bytes=sum(sizes.values()) + sizes["auto-a"] // 2).save(Home(tmp_path).settings)
    new = build(caches, "auto-d", plain_registry)  # a fourth, the same size: over by half a cache
    assert sorted(c.name for c in caches.list()) == ["auto-b", "auto-c", "auto-d"]
    [event] = [e for e in new.events if e.reason == "BudgetEnforced"]
    assert event.message.startswith("automatic image cache auto-a (") and "least recently used" in event.message


def test_imc_config_set_reads_the_budget_as_a_size(tmp_path: Path) -> None:
    assert ok(tmp_path, "config", "set", "auto_max_bytes", "200G").stdout.strip() == "auto_max_bytes = 200000000000"
    assert Settings.load(Home(tmp_path).settings).auto_max_bytes == 200 * 10**9
    assert json.loads(ok(tmp_path, "config", "get", "-o", "json").stdout)["auto_max_bytes"] == 200 * 10**9
    ok(tmp_path, "config", "set", "auto_max_bytes", "1.5Ti")
    assert Settings.load(Home(tmp_path).settings).auto_max_bytes == 3 * 2**39
    ok(tmp_path, "config", "set", "auto_max_bytes", "0")
    assert Settings.load(Home(tmp_path).settings).auto_max_bytes == 0
    for bad in ("lots", "-5G"):
        out = run_imc(tmp_path, "config", "set", "auto_max_bytes", "--", bad)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "auto_max_bytes" in out.stderr, out.stderr
    out = run_imc(tmp_path, "config", "set", "auto_unused_days", "7d")
    assert out.returncode == 2 and "auto_unused_days" in out.stderr
    assert Settings.load(Home(tmp_path).settings).auto_unused_days == 30


# -- gc --dry-run ---------------------------------------------------------------------------------


def snapshot(home: Path) -> dict[str, Any]:
    """Every file under the home but the database's own files (with size and mtime),
    and every record."""
    files = {str(p.relative_to(home)): (p.stat().st_size, p.stat().st_mtime_ns) for p in home.rglob("*")
             if p.is_file() and not p.name.startswith("caches.db")}
    with sqlite3.connect(Home(home).records) as db:
        records = sorted(db.execute("SELECT name, doc FROM caches").fetchall())
        revision = db.execute("SELECT n FROM revision").fetchone()
    return {"files": files, "records": records, "revision": revision}


def test_gc_dry_run_lists_what_gc_would_delete_and_why_and_deletes_nothing(tmp_path: Path,
                                                                          plain_registry: Any) -> None:
    home = tmp_path / "home"
    caches = Caches(home)
    past = build(caches, "past", plain_registry, retention_days=1)
    stale = build(caches, "auto-stale", plain_registry, image="fixtures/app:1.0")
    big = build(caches, "auto-big", plain_registry, image="fixtures/app:1.0")
    kept = build(caches, "kept", plain_registry)
    long_ago = rfc3339(dt.datetime.now(dt.UTC) - dt.timedelta(days=40))
    ended = rfc3339(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    caches.change(past.name, lambda c: setattr(c, "expire", ended))
    caches.change(stale.name, lambda c: setattr(c, "created", long_ago))
    caches.change(big.name, lambda c: setattr(c, "created", rfc3339(dt.datetime.now(dt.UTC) - dt.timedelta(days=2))))
    Settings(auto_max_bytes=1).save(Home(home).settings)
    orphan = Home(home).volume("imc-orphan0000000000000", 1)
    orphan.write_bytes(b"x" * 1000)
    # The builds' blobs stay in the store once packed, needed by nothing: gc's to remove.
    before = snapshot(home)

    out = ok(home, "gc", "--dry-run")
    dry = json.loads(ok(home, "gc", "--dry-run", "-o", "json").stdout)
    assert snapshot(home) == before  # nothing deleted, nothing written

    assert dry["dryRun"] is True and dry["autoMaxBytes"] == 1 and dry["autoBytes"] == 0  # both automatic ones go
    assert {c["name"]: c["cause"] for c in dry["caches"]} == {"past": "expired", "auto-stale": UNUSED,
                                                             "auto-big": BUDGET}
    reasons = {c["name"]: c["reason"] for c in dry["caches"]}
    assert reasons["past"] == f"retention of 1 days ended at {ended}"
    assert reasons["auto-stale"].startswith(f"automatic, unused since {long_ago}: auto_unused_days (30) ended at")
    assert "over auto_max_bytes" in reasons["auto-big"]
    assert all(c["bytes"] > 0 for c in dry["caches"])
    assert dry["volumeFiles"] == [{"path": str(orphan), "bytes": 1000}]
    assert dry["blobs"] and all(b["bytes"] > 0 for b in dry["blobs"])
    assert dry["bytesFreed"] == sum(b["bytes"] for b in dry["blobs"])
    for name in ("past", "auto-stale", "auto-big"):
        assert f"would delete image cache {name} (" in out.stdout
    assert f"would remove orphan volume file {orphan}" in out.stdout
    assert out.stdout.count("would remove blob sha256:") == len(dry["blobs"])
    assert out.stdout.rstrip().endswith("nothing was deleted")

    done = json.loads(ok(home, "gc", "-o", "json").stdout)  # then gc does what the dry run said
    assert done["dryRun"] is False
    assert sorted(done["cachesDeleted"]) == sorted(c["name"] for c in dry["caches"])
    assert done["blobsRemoved"] == len(dry["blobs"]) and done["volumesRemoved"] == 1
    assert [c.name for c in Caches(home).list()] == [kept.name]


# -- ExpiringSoon -----------------------------------------------------------------------------------


def test_a_manual_cache_in_use_near_the_end_of_its_retention_is_warned_once(tmp_path: Path,
                                                                            plain_registry: Any) -> None:
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    build(caches, "idle", plain_registry, retention_days=2)
    build(caches, "busy", plain_registry, retention_days=2)
    clock.now += dt.timedelta(hours=12)
    caches.mark_used("busy")  # used, but the retention is far off: no warning
    clock.now += dt.timedelta(hours=13)  # 23 hours before the end
    caches.gc()
    warned = [e for e in caches.get("busy").events if e.reason == EXPIRING_SOON]
    assert len(warned) == 1 and warned[0].type == "Warning"
    assert caches.get("busy").expire in warned[0].message
    assert not [e for e in caches.get("idle").events if e.reason == EXPIRING_SOON]  # not used within a day
    for _ in range(3):  # more sweeps and hits: still one
        caches.gc()
        caches.mark_used("busy", 5)
        clock.now += dt.timedelta(hours=1)
    assert len([e for e in caches.get("busy").events if e.reason == EXPIRING_SOON]) == 1


def test_a_hit_near_the_end_of_the_retention_warns_at_once(tmp_path: Path, plain_registry: Any) -> None:
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    build(caches, "day", plain_registry, retention_days=1)
    clock.now += dt.timedelta(hours=2)
    hits = Hits(caches)
    hits.hit("day")
    hits.flush()
    [event] = [e for e in caches.get("day").events if e.reason == EXPIRING_SOON]
    assert event.type == "Warning" and "retention ends at" in event.message
