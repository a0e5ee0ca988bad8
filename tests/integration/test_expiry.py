"""Expiry is real: an expired cache is never matched, served or reported, whichever
process looks first; that one deletes it (record and volume). A settable clock is
injected into ``Caches``; the CLI case moves a record's expiry into the past instead."""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from support.clock import Clock

from builder.build import Builder
from builder.caches import Caches
from builder.errors import NotFoundLocalError
from builder.home import Home
from builder.imagecache import CacheSpec, ImageCache, Settings, rfc3339
from builder.matcher import Matcher, MatchRequest
from builder.server.app import Server

IMAGE = "fixtures/base:1.0"


def build(caches: Caches, name: str, registry: Any, **kw: Any) -> ImageCache:
    spec = CacheSpec(images=[f"{registry.host}/{IMAGE}"], plain_http=[registry.host], **kw)
    _, lease = caches.create(name, spec, auto=name.startswith("auto-"), instance_id=name.removeprefix("auto-"))
    result = Builder(caches).build(name, lease)
    assert result.phase == "Ready", result.message
    return result


def gone(home: Path, cache: ImageCache) -> bool:
    """No record under the name (read past every check, straight from the database) and
    no volume file of the cache's id."""
    import sqlite3

    with sqlite3.connect(Home(home).records) as db:
        row = db.execute("SELECT 1 FROM caches WHERE name=?", (cache.name,)).fetchone()
    return row is None and not Home(home).volumes_of(cache.id)


READERS: dict[str, Callable[[Caches, ImageCache], object]] = {
    "get": lambda caches, c: caches.get(c.name),
    "find by id": lambda caches, c: caches.find(c.id),
    "list": lambda caches, c: caches.list(),
    "match": lambda caches, c: Matcher(caches).best(MatchRequest((c.spec.images[0],))),
    "explicit id": lambda caches, c: Matcher(caches).best(MatchRequest((c.spec.images[0],), cache_id=c.id)),
    "a hit": lambda caches, c: caches.mark_used(c.name),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_a_cache_past_its_retention_is_deleted_by_the_first_reader(tmp_path: Path, plain_registry: Any,
                                                                   reader: str) -> None:
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    week = build(caches, "week", plain_registry, retention_days=7)
    clock.now += dt.timedelta(days=7) - dt.timedelta(seconds=1)
    READERS[reader](caches, week)  # a second before: still there, whatever the reader
    assert not gone(tmp_path, week) and caches.get("week").phase == "Ready"
    clock.now += dt.timedelta(seconds=1)
    try:
        result = READERS[reader](caches, week)
    except NotFoundLocalError as e:
        assert reader in ("get", "find by id", "explicit id", "a hit")
        assert "does not exist" in e.message
    else:
        assert reader in ("list", "match")
        assert result == [] or getattr(result, "cache", None) is None
    assert gone(tmp_path, week)


def test_a_failed_cache_goes_24_hours_after_it_failed(tmp_path: Path) -> None:
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    _, lease = caches.create("broken", CacheSpec(images=["127.0.0.1:1/x/y:1"], plain_http=["127.0.0.1:1"]))
    failed = Builder(caches).build("broken", lease)
    assert failed.phase == "Failed" and failed.expire == rfc3339(clock.now + dt.timedelta(hours=24))
    clock.now += dt.timedelta(hours=24) - dt.timedelta(seconds=1)
    assert [c.name for c in caches.list()] == ["broken"]
    clock.now += dt.timedelta(seconds=1)
    assert caches.list() == [] and gone(tmp_path, failed)


def test_an_unused_automatic_cache_is_not_matched_and_is_deleted(tmp_path: Path, plain_registry: Any) -> None:
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    Settings(auto_unused_days=3).save(Home(tmp_path).settings)
    auto = build(caches, "auto-eci-1", plain_registry)
    request = MatchRequest((auto.spec.images[0],))
    clock.now += dt.timedelta(days=2)
    assert Matcher(caches).best(request).cache.name == "auto-eci-1"  # a use: three more days from now
    clock.now += dt.timedelta(days=3) - dt.timedelta(seconds=1)
    assert Matcher(caches).best(request).cache.name == "auto-eci-1"
    clock.now += dt.timedelta(days=3)
    assert Matcher(caches).best(request).cache is None
    assert gone(tmp_path, auto)


def test_an_expired_name_and_quota_place_are_free_for_a_new_cache(tmp_path: Path, plain_registry: Any) -> None:
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    Settings(max_manual_caches=1).save(Home(tmp_path).settings)
    old = build(caches, "day", plain_registry, retention_days=1)
    clock.now += dt.timedelta(days=1)
    new = build(caches, "day", plain_registry, retention_days=1)
    assert caches.get("day").id == new.id != old.id
    assert not Home(tmp_path).volumes_of(old.id)


def test_imc_serve_stops_serving_at_the_expiry_and_logs_the_deletion(tmp_path: Path, plain_registry: Any,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    day = build(caches, "day", plain_registry, retention_days=1)
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0).start()
    url = f"http://{server.address}/v2/fixtures/base/manifests/1.0?ns={plain_registry.host}"
    accept = {"Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
                        "application/vnd.docker.distribution.manifest.v2+json, "
                        "application/vnd.docker.distribution.manifest.list.v2+json"}
    try:
        caplog.set_level(logging.INFO, logger="builder")
        assert requests.get(url, headers=accept, timeout=10).status_code == 200
        clock.now += dt.timedelta(days=1)
        # The very next request, well within the index's lifetime: the expiry forces a rebuild.
        assert requests.get(url, headers=accept, timeout=10).status_code == 404
        listed = requests.get(f"http://{server.address}/apis/eci.alibabacloud.com/v1/imagecaches", timeout=10)
        assert listed.json()["items"] == []
    finally:
        server.stop()
    assert gone(tmp_path, day)
    assert any(f"image cache day ({day.id}) expired at" in r.getMessage() and r.name == "builder.caches"
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_the_first_imc_command_deletes_an_expired_cache(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    caches = Caches(home)
    past = build(caches, "past", plain_registry, retention_days=1)
    kept = build(caches, "kept", plain_registry)
    caches.change("past", lambda c: setattr(c, "expire", rfc3339(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))))
    env = {**os.environ, "IMC_HOME": str(home)}
    listed = subprocess.run([sys.executable, "-m", "builder", "cache", "list"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "kept" in listed.stdout and "past" not in listed.stdout
    assert gone(home, past) and not gone(home, kept)
    got = subprocess.run([sys.executable, "-m", "builder", "cache", "get", "past"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert got.returncode == 6 and "does not exist" in got.stderr
