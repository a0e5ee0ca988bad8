"""A record's stored form and its match index: ``ImageCache.to_doc`` writes what
``dataclasses.asdict`` would, byte for byte; a write notices a spec change however
``change`` makes it; and the ranking's fast path for one wanted pair answers what the
general query does."""

from __future__ import annotations

import json
import random
import sqlite3
from dataclasses import asdict
from pathlib import Path

from builder.caches import Caches
from builder.imagecache import (
    READY,
    CacheSpec,
    Condition,
    ImageCache,
    ResolvedImage,
    VolumeInfo,
)
from builder.records import _RANK_SQL, CacheDB, Ranked


def full_record() -> ImageCache:
    """A record with every field set away from its default, nested values included."""
    spec = CacheSpec(["registry.example.com/team/app:1.0", "registry.example.com/team/db@sha256:" + "a" * 64],
                     ["default:pull"], 40, 7, True, True, ["reg.local:5000"], ["other.local"],
                     {"k8s.aliyun.com/vswitch-ids": "vsw-1", "imc.dev/on-drift": "update"}, "update")
    cache = ImageCache("app", "imc-0123456789abcdefg", spec, "2026-11-29T20:50:00Z", READY, 100,
                       "2026-11-29T20:50:01Z", "2026-11-29T20:51:00Z", "2026-12-06T20:50:00Z", "2026-11-30T01:00:00Z",
                       3, True, "i-1")
    cache.images = [ResolvedImage("registry.example.com/team/app:1.0", "sha256:" + "b" * 64,
                                  "application/vnd.oci.image.manifest.v1+json", 1200, "sha256:" + "c" * 64,
                                  "application/vnd.oci.image.index.v1+json", 900, "linux/amd64")]
    cache.pinned = list(cache.images)
    cache.volume = VolumeInfo("/var/lib/imc/volumes/app.img", 10, 20, 30, 2)
    cache.volume_state = "ready"
    cache.bytes_fetched, cache.bytes_reused, cache.unpacked_bytes = 1, 2, 3
    cache.message, cache.generation, cache.resource_version, cache.spec_generation = "built", 4, 5, 6
    cache.conditions = [Condition("Stale", "True", "TagMoved", "app:1.0 moved", "2026-11-30T00:00:00Z", 6)]
    cache.moved_tags = {"registry.example.com/team/app:1.0": "sha256:" + "d" * 64}
    cache.drift_warned = "2026-11-30T00:30:00Z"
    for n in range(12):
        cache.event("LayerFetched", f"blob {n} fetched", "Warning" if n % 2 else "Normal")
    return cache


def test_to_doc_writes_exactly_what_asdict_writes() -> None:
    cache = full_record()
    doc = cache.to_doc()
    assert json.dumps(doc) == json.dumps(asdict(cache))
    assert ImageCache.from_doc(json.loads(json.dumps(doc))) == cache
    # The containers are the document's own: changing them leaves the record as it was.
    doc["spec"]["images"].append("x")
    doc["events"][0]["reason"] = "Changed"
    doc["spec"]["annotations"]["new"] = "1"
    assert json.dumps(cache.to_doc()) == json.dumps(asdict(full_record()))


def test_a_spec_changed_in_place_moves_its_generation_and_a_status_write_does_not(tmp_path: Path) -> None:
    db = CacheDB(tmp_path / "caches.db")
    db.insert(full_record(), quota=10)
    generation = db.get("app").spec_generation
    assert db.update("app", lambda c: setattr(c, "last_used", "2026-11-30T02:00:00Z")).spec_generation == generation
    assert db.update("app", lambda c: c.spec.annotations.update(extra="1")).spec_generation == generation + 1
    assert db.update("app", lambda c: c.spec.images.pop()).spec_generation == generation + 2
    assert db.get("app").spec.images == ["registry.example.com/team/app:1.0"]
    ranked = Caches(tmp_path).ranked
    assert ranked([("registry.example.com/team/db", "sha256:" + "a" * 64)], 0, 10) == []
    assert [r.name for r in ranked([("registry.example.com/team/app", "1.0")], 0, 10)] == ["app"]


def test_the_fast_paths_rank_as_the_general_query_does(tmp_path: Path) -> None:
    """The single-pair path (two ordered index walks that stop at the limit) and the
    several-pair one (the exact holders first) give the general query's answer, ties in
    size and age included, for every limit."""
    db = CacheDB(tmp_path / "caches.db")
    rnd = random.Random(7)
    repositories = [f"registry.example.com/team/app{n}" for n in range(3)]
    for n in range(120):
        images = [f"{repo}:{rnd.randint(1, 4)}.0" for repo in rnd.sample(repositories, rnd.randint(1, 3))]
        cache = ImageCache(f"cache-{n:03d}", f"imc-{n:017d}", CacheSpec(images, size_gib=rnd.choice((20, 40, 60))),
                           f"2026-11-{rnd.randint(1, 3):02d}T00:00:00Z", READY if n % 10 else "Updating", 100)
        db.insert(cache, quota=1000)
    with sqlite3.connect(tmp_path / "caches.db") as con:
        def general(wanted: list[tuple[str, str]], size: int, limit: int) -> list[Ranked]:
            sql = _RANK_SQL.format(pairs=", ".join("(?, ?)" for _ in wanted))
            return [Ranked(*r) for r in con.execute(sql, (*(x for pair in wanted for x in pair), size, limit))]

        pairs = [(repo, version) for repo in [*repositories, "registry.example.com/team/none"]
                 for version in ("1.0", "3.0", "9.0")]
        requests = [[pair] for pair in pairs] + [rnd.sample(pairs, rnd.randint(2, 4)) for _ in range(15)]
        for wanted in requests:
            for size in (0, 41):
                for limit in (0, 1, 5, 10, 200):
                    assert db.rank(wanted, size, limit) == general(wanted, size, limit)


def test_a_database_from_before_the_ordering_index_gets_it_and_ranks_the_same(tmp_path: Path) -> None:
    db = CacheDB(tmp_path / "caches.db")
    db.insert(full_record(), quota=10)
    with sqlite3.connect(tmp_path / "caches.db") as con:
        con.execute("DROP INDEX match_index_order")
    reopened = CacheDB(tmp_path / "caches.db")
    with sqlite3.connect(tmp_path / "caches.db") as con:
        assert con.execute("SELECT 1 FROM sqlite_master WHERE name='match_index_order'").fetchone()
    assert [r.name for r in reopened.rank([("registry.example.com/team/app", "1.0")], 20, 10)] == ["app"]
