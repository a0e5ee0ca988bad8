"""The matcher on records alone (no registry): every ranking rule, explicit ids,
auto-create, marking hits used, and requests read from Pod and Deployment YAML."""

from __future__ import annotations

import datetime as dt
import json
import random
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from builder import matcher as matcher_module
from builder.caches import BuildLease, Caches
from builder.cli.common import Context
from builder.cli.match_cmd import match
from builder.errors import (
    CacheStateError,
    ImcError,
    NoMatchError,
    NotFoundLocalError,
    QuotaError,
    ValidationError,
)
from builder.home import Home
from builder.imagecache import (
    CREATING,
    FAILED,
    READY,
    UPDATE_FAILED,
    UPDATING,
    CacheSpec,
    ImageCache,
    ResolvedImage,
    Settings,
    rfc3339,
)
from builder.matcher import (
    RANKING_LIMIT,
    Candidate,
    Entry,
    Matcher,
    MatchRequest,
    rank,
    rank_index,
    request_from_pod,
)

REG = "registry.example.com:5000"
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def img(ref: str) -> str:
    return f"{REG}/{ref}"


def digest(n: int) -> str:
    return "sha256:" + f"{n:064x}"


def made_up(ref: str) -> str:
    """The digest ``record`` gives an image unless told otherwise."""
    return digest(zlib.crc32(ref.encode()))


class Clock:
    """A settable clock injected into Caches, so created and last-used times are known."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def caches(tmp_path: Path, clock: Clock) -> Caches:
    return Caches(tmp_path, clock=clock)


@pytest.fixture
def leases() -> Iterator[list[BuildLease]]:
    """Leases of caches kept Creating/Updating for a test: released at its end."""
    held: list[BuildLease] = []
    yield held
    for lease in held:
        lease.release()


def record(caches: Caches, name: str, *images: str, size: int = 20, age_hours: float = 0, phase: str = READY,
           resolved: dict[str, str] | None = None, leases: list[BuildLease] | None = None) -> ImageCache:
    """A cache record as a finished build leaves it, without a registry: created
    ``age_hours`` before T0, in ``phase``, holding ``images`` (digests from ``resolved``
    or made up). Caches meant to stay Creating/Updating keep their lease in ``leases``,
    so nobody mistakes them for a dead build."""
    _, lease = caches.create(name, CacheSpec(images=[img(i) for i in images], size_gib=size))
    if leases is not None and phase in (CREATING, UPDATING):
        leases.append(lease)
    else:
        lease.release()
    resolved = resolved or {}

    def finish(c: ImageCache) -> None:
        c.created = rfc3339(T0 - dt.timedelta(hours=age_hours))  # type: ignore[assignment]
        c.phase = phase
        c.progress = 100 if phase == READY else 0
        c.images = [ResolvedImage(img(i), resolved.get(i, made_up(i)), "application/vnd.oci.image.manifest.v1+json", 500)
                    for i in images] if phase != CREATING else []

    return caches.change(name, finish)


def best(caches: Caches, *images: str, **kw: Any) -> Any:
    return Matcher(caches).best(MatchRequest(tuple(img(i) for i in images), **kw))


def names(result: Any) -> list[str]:
    return [c.entry.name for c in result.ranking]


# -- ranking ----------------------------------------------------------------------------------


def test_storage_filter_keeps_only_caches_at_least_as_big_as_the_request(caches: Caches) -> None:
    record(caches, "small", "team/app:1.0", size=20)
    record(caches, "exact", "team/app:1.0", size=40)
    record(caches, "large", "team/app:1.0", size=100)
    result = best(caches, "team/app:1.0", storage_gib=40)
    assert result.cache.name == "exact"
    assert names(result) == ["exact", "large"]  # "small" (20 < 40) is not even a candidate
    assert best(caches, "team/app:1.0", storage_gib=41).cache.name == "large"
    assert best(caches, "team/app:1.0", storage_gib=101).cache is None


def test_same_version_beats_same_repository_in_another_version(caches: Caches) -> None:
    record(caches, "other-version", "team/app:2.0", age_hours=0)  # newer, same size
    record(caches, "same-version", "team/app:1.0", age_hours=5)
    result = best(caches, "team/app:1.0")
    assert result.cache.name == "same-version"
    assert [(c.entry.name, c.exact, c.same_repository) for c in result.ranking] == [
        ("same-version", 1, 0), ("other-version", 0, 1)]
    assert "1 of 1 images with the same version" in result.reason


def test_more_images_matched_beats_fewer(caches: Caches) -> None:
    record(caches, "one", "team/app:1.0", size=20, age_hours=0)
    record(caches, "two", "team/app:1.0", "team/worker:1.0", size=200, age_hours=9)  # bigger and older: still wins
    record(caches, "repos", "team/app:9", "team/worker:9", "team/cron:9", size=20)
    result = best(caches, "team/app:1.0", "team/worker:1.0", "team/cron:1.0")
    assert names(result) == ["two", "one", "repos"]  # (2 exact, 0) > (1, 0) > (0 exact, 3 repositories)
    assert [c.degree for c in result.ranking] == [(2, 0), (1, 0), (0, 3)]
    # Among equal exact counts, more images in the same repository win.
    record(caches, "two-and-repo", "team/app:1.0", "team/worker:1.0", "team/cron:0.1", size=200, age_hours=20)
    assert best(caches, "team/app:1.0", "team/worker:1.0", "team/cron:1.0").cache.name == "two-and-repo"


def test_caches_holding_no_requested_repository_are_not_candidates(caches: Caches) -> None:
    record(caches, "unrelated", "team/other:1.0")
    record(caches, "other-registry", "team/app:1.0")
    caches.change("other-registry", lambda c: setattr(c, "images", []))
    result = Matcher(caches).best(MatchRequest(("docker.io/team/app:1.0",)))
    assert result.cache is None and result.ranking == [] and not result.created
    assert "no Ready cache holds the repository" in result.reason


def test_size_closest_to_the_request_breaks_a_tie_in_degree(caches: Caches) -> None:
    record(caches, "huge", "team/app:1.0", size=500, age_hours=0)
    record(caches, "snug", "team/app:1.0", size=30, age_hours=10)
    record(caches, "mid", "team/app:1.0", size=60, age_hours=0)
    assert names(best(caches, "team/app:1.0", storage_gib=25)) == ["snug", "mid", "huge"]


def test_newest_breaks_a_tie_in_degree_and_size(caches: Caches) -> None:
    record(caches, "old", "team/app:1.0", age_hours=48)
    record(caches, "new", "team/app:1.0", age_hours=1)
    record(caches, "middle", "team/app:1.0", age_hours=24)
    assert names(best(caches, "team/app:1.0")) == ["new", "middle", "old"]


def test_equal_caches_rank_in_a_stable_order(caches: Caches) -> None:
    for name in ("b", "c", "a"):
        record(caches, name, "team/app:1.0")
    assert names(best(caches, "team/app:1.0")) == ["a", "b", "c"]


@pytest.mark.parametrize("phase", [CREATING, FAILED, UPDATING, UPDATE_FAILED])
def test_caches_not_ready_are_never_chosen(caches: Caches, leases: list[BuildLease], phase: str) -> None:
    record(caches, "not-ready", "team/app:1.0", "team/worker:1.0", size=20, phase=phase, leases=leases)
    record(caches, "ready", "team/app:2.0", size=500, age_hours=100)
    result = best(caches, "team/app:1.0", "team/worker:1.0")
    assert result.cache.name == "ready" and names(result) == ["ready"]
    caches.delete("ready")
    assert best(caches, "team/app:1.0", "team/worker:1.0").cache is None


def test_a_cache_leaving_ready_leaves_the_ranking_and_coming_back_returns(caches: Caches) -> None:
    record(caches, "app", "team/app:1.0")
    caches.change("app", lambda c: setattr(c, "phase", UPDATING))
    assert best(caches, "team/app:1.0").cache is None
    caches.change("app", lambda c: setattr(c, "phase", READY))
    assert best(caches, "team/app:1.0").cache.name == "app"


def test_request_by_digest_matches_the_cache_that_resolved_its_tag_to_it(caches: Caches) -> None:
    record(caches, "pinned", "team/app:1.0", resolved={"team/app:1.0": digest(7)})
    record(caches, "other", "team/app:2.0")
    result = best(caches, f"team/app@{digest(7)}")
    assert result.cache.name == "pinned" and result.ranking[0].exact == 1
    # The index digest of a multi-platform image counts too.
    caches.change("other", lambda c: setattr(c.images[0], "index", digest(99)))
    assert best(caches, f"team/app:2.0@{digest(99)}").cache.name == "other"


def test_references_are_normalised_before_comparing(caches: Caches) -> None:
    _, lease = caches.create("hub", CacheSpec(images=["nginx"]))
    lease.release()
    caches.change("hub", lambda c: setattr(c, "phase", READY))
    assert Matcher(caches).best(MatchRequest(("docker.io/library/nginx:latest",))).cache.name == "hub"
    assert Matcher(caches).best(MatchRequest(("index.docker.io/library/nginx",))).ranking[0].exact == 1


def test_rank_reports_the_best_ten_with_their_numbers(caches: Caches) -> None:
    for n in range(12):
        record(caches, f"c{n:02d}", "team/app:1.0", size=20 + n)
    ranked = rank_index(caches, MatchRequest((img("team/app:1.0"),), storage_gib=21))
    assert len(ranked) == RANKING_LIMIT and [c.entry.name for c in ranked] == [f"c{n:02d}" for n in range(1, 11)]
    first = caches.get("c01")
    assert ranked[0] == Candidate(Entry("c01", first.id, 21, first.created), 1, 0)
    assert ranked[0].to_json() == {"name": "c01", "imageCacheId": first.id, "exactImages": 1,
                                   "sameRepositoryImages": 0, "imageCacheSize": 21, "created": first.created}
    assert len(best(caches, "team/app:1.0").ranking) == RANKING_LIMIT


def test_rank_in_memory_agrees_with_rank_in_sql(caches: Caches, tmp_path: Path) -> None:
    """The matcher ranks in SQL; the serving index ranks caches it holds in memory:
    both must follow the same rules, on any records."""
    Settings(max_manual_caches=1000).save(Home(tmp_path).settings)
    rnd = random.Random(7)
    repos = [f"team/r{n}" for n in range(6)]
    for n in range(120):
        images = list(dict.fromkeys(f"{rnd.choice(repos)}:{rnd.randint(1, 3)}" for _ in range(rnd.randint(1, 3))))
        record(caches, f"c{n:03d}", *images, size=rnd.choice([20, 30, 40]), age_hours=rnd.choice([0, 1, 2]),
               phase=rnd.choice([READY, READY, READY, FAILED, UPDATE_FAILED]))
    ready = [Entry.of(c) for c in caches.list() if c.phase == READY]
    for _ in range(60):
        wanted = tuple(img(f"{rnd.choice(repos)}:{rnd.randint(1, 4)}") for _ in range(rnd.randint(1, 4)))
        request = MatchRequest(wanted, storage_gib=rnd.choice([0, 20, 25, 35, 41]))
        in_memory = [(c.entry.name, c.degree) for c in rank(ready, request)][:RANKING_LIMIT]
        assert [(c.entry.name, c.degree) for c in rank_index(caches, request)] == in_memory, request


def test_a_request_naming_two_versions_of_one_repository(caches: Caches) -> None:
    record(caches, "both", "team/app:1.0", "team/app:2.0", size=40)
    record(caches, "one", "team/app:1.0", size=20)
    result = best(caches, "team/app:1.0", "team/app:2.0")
    assert [(c.entry.name, c.degree) for c in result.ranking] == [("both", (2, 0)), ("one", (1, 1))]


# -- explicit cache id ----------------------------------------------------------------------------


def test_explicit_cache_id_wins_over_a_better_match(caches: Caches) -> None:
    record(caches, "perfect", "team/app:1.0")
    named = record(caches, "named", "team/base:1.0", size=100)
    result = best(caches, "team/app:1.0", cache_id=named.id)
    assert result.cache.name == "named" and result.reason == f"explicit cache id {named.id}"
    assert any("does not hold" in w and "team/app:1.0" in w for w in result.warnings)
    held = best(caches, "team/base:1.0", cache_id=named.id)
    assert held.warnings == ()


def test_explicit_cache_id_missing_is_not_found(caches: Caches) -> None:
    record(caches, "app", "team/app:1.0")
    with pytest.raises(NotFoundLocalError, match="image cache id imc-doesnotexist0000 does not exist"):
        best(caches, "team/app:1.0", cache_id="imc-doesnotexist0000")


@pytest.mark.parametrize("phase", [CREATING, FAILED, UPDATING, UPDATE_FAILED])
def test_explicit_cache_id_not_ready_is_a_state_error(caches: Caches, leases: list[BuildLease], phase: str) -> None:
    named = record(caches, "busy", "team/app:1.0", phase=phase, leases=leases)
    with pytest.raises(CacheStateError, match=f"image cache busy \\({named.id}\\) is {phase}, not Ready"):
        best(caches, "team/app:1.0", cache_id=named.id)
    assert caches.get("busy").last_used is None


def test_explicit_cache_id_too_small_is_used_with_a_warning(caches: Caches) -> None:
    named = record(caches, "small", "team/app:1.0", size=20)
    match = best(caches, "team/app:1.0", cache_id=named.id, storage_gib=21)
    assert match.cache.name == "small"
    assert any("is 20 GiB, less than the 21 GiB of storage requested" in w for w in match.warnings)
    assert not best(caches, "team/app:1.0", cache_id=named.id, storage_gib=20).warnings


def test_explicit_cache_id_of_a_dead_build_reports_it_failed(caches: Caches) -> None:
    created, lease = caches.create("dead", CacheSpec(images=[img("team/app:1.0")]))
    lease.release()  # the builder died
    with pytest.raises(CacheStateError, match="is Failed, not Ready"):
        best(caches, "team/app:1.0", cache_id=created.id)


# -- hits and auto-create ----------------------------------------------------------------------------


def test_a_hit_marks_the_cache_used_and_a_miss_marks_nothing(caches: Caches, clock: Clock) -> None:
    record(caches, "app", "team/app:1.0")
    record(caches, "runner-up", "team/app:2.0")
    clock.now = T0 + dt.timedelta(days=3)
    result = best(caches, "team/app:1.0")
    assert result.cache.last_used == "2026-11-04T12:00:00Z"
    assert caches.get("app").last_used == "2026-11-04T12:00:00Z"
    assert caches.get("runner-up").last_used is None
    named = caches.get("runner-up")
    clock.now += dt.timedelta(hours=1)
    best(caches, "team/app:1.0", cache_id=named.id)
    assert caches.get("runner-up").last_used == "2026-11-04T13:00:00Z"


def test_an_automatic_cache_shows_when_it_expires_from_its_last_use(caches: Caches, clock: Clock) -> None:
    created = best(caches, "team/app:1.0", auto_match=True, instance_id="eci-9")
    created.lease.release()
    name = created.cache.name
    caches.change(name, lambda c: setattr(c, "phase", READY))
    assert caches.get(name).expire == "2026-12-01T12:00:00Z"  # created at T0, 30 days unused
    assert caches.get(name).to_object()["status"]["expireDateTime"] == "2026-12-01T12:00:00Z"
    clock.now = T0 + dt.timedelta(days=10)
    assert best(caches, "team/app:1.0").cache.name == name  # a hit moves the date on
    assert caches.get(name).expire == "2026-12-11T12:00:00Z"
    assert [c.expire for c in caches.list()] == ["2026-12-11T12:00:00Z"]
    clock.now = T0 + dt.timedelta(days=40, seconds=1)
    assert caches.list() == []  # expired at the date it showed


def test_auto_match_with_a_match_creates_nothing(caches: Caches) -> None:
    record(caches, "app", "team/app:1.0")
    result = best(caches, "team/app:3.0", auto_match=True, instance_id="eci-1")
    assert result.cache.name == "app" and not result.created and result.lease is None
    assert [c.name for c in caches.list()] == ["app"]


@pytest.mark.parametrize("storage,size", [(0, 20), (30, 50), (32748, 32768), (40000, 32768)])
def test_auto_match_without_a_match_creates_an_automatic_cache(caches: Caches, storage: int, size: int) -> None:
    record(caches, "unrelated", "team/other:1.0", size=32768)
    result = best(caches, "team/app:1.0", "team/worker:2.0", storage_gib=storage, auto_match=True,
                  instance_id="eci-7", plain_http=(REG,))
    try:
        assert result.created and result.lease is not None
        cache = result.cache
        assert cache.name == "auto-create-for-eci-7" and cache.auto and cache.instance_id == "eci-7"
        assert cache.phase == CREATING and cache.spec.size_gib == size
        assert cache.spec.images == [img("team/app:1.0"), img("team/worker:2.0")]
        assert cache.spec.plain_http == [REG]
        assert "created the automatic cache auto-create-for-eci-7" in result.reason
        assert caches.get(cache.name).auto
        assert any("more than the largest cache" in w for w in result.warnings) == (storage > 32768)
        # The lease is the right to build it: nobody else can take it meanwhile.
        with pytest.raises(CacheStateError):
            BuildLease(caches.home.cache_lock(cache.id))
    finally:
        result.lease.release()


def test_auto_match_needs_an_instance_id_with_a_valid_name(caches: Caches) -> None:
    with pytest.raises(ValidationError, match="needs an instance id"):
        best(caches, "team/app:1.0", auto_match=True)
    with pytest.raises(ValidationError, match="instance id 'Pod_1' does not make a valid cache name"):
        best(caches, "team/app:1.0", auto_match=True, instance_id="Pod_1")
    assert caches.list() == []


def test_auto_match_twice_for_one_instance_says_it_exists(caches: Caches) -> None:
    first = best(caches, "team/app:1.0", auto_match=True, instance_id="eci-1")
    try:
        with pytest.raises(CacheStateError, match="auto-create-for-eci-1 already exists \\(Creating\\)"):
            best(caches, "team/app:1.0", auto_match=True, instance_id="eci-1")
    finally:
        first.lease.release()


def test_auto_match_respects_the_automatic_quota(tmp_path: Path) -> None:
    Settings(max_manual_caches=2).save(Home(tmp_path).settings)
    caches = Caches(tmp_path)
    best(caches, "team/app:1.0", auto_match=True, instance_id="a").lease.release()
    with pytest.raises(QuotaError, match="automatic"):
        best(caches, "team/app:1.0", auto_match=True, instance_id="b")


def test_bad_image_in_a_request_is_a_validation_error(caches: Caches) -> None:
    with pytest.raises(ValidationError, match="invalid image reference"):
        Matcher(caches).best(MatchRequest(("Not An Image",)))
    with pytest.raises(ValidationError, match="at least one image"):
        Matcher(caches).best(MatchRequest(()))


# -- the match index -----------------------------------------------------------------------------


def index_rows(caches: Caches) -> list[tuple[Any, ...]]:
    with sqlite3.connect(caches.home.records) as db:
        return db.execute("SELECT repository, name, size_gib, versions FROM match_index ORDER BY name, repository").fetchall()


def test_the_index_follows_every_write_and_is_rebuilt_for_an_old_database(caches: Caches, tmp_path: Path) -> None:
    record(caches, "app", "team/app:1.0", "team/worker:2.0", size=40)
    app = f" 1.0 {made_up('team/app:1.0')} "
    assert index_rows(caches) == [(f"{REG}/team/app", "app", 40, app),
                                  (f"{REG}/team/worker", "app", 40, f" 2.0 {made_up('team/worker:2.0')} ")]
    caches.change("app", lambda c: setattr(c, "phase", UPDATING))
    assert index_rows(caches) == []  # only Ready caches are in the index
    caches.change("app", lambda c: (setattr(c, "phase", READY), setattr(c.spec, "images", [img("team/app:1.0")]),
                                       c.images.pop()))
    assert index_rows(caches) == [(f"{REG}/team/app", "app", 40, app)]
    # A database from before the index: the next opening builds it from the records.
    with sqlite3.connect(tmp_path / "caches.db") as db:
        db.execute("DROP TABLE match_index")
    assert best(Caches(tmp_path), "team/app:1.0").cache.name == "app"
    assert index_rows(caches) == [(f"{REG}/team/app", "app", 40, app)]
    caches.delete("app")
    assert index_rows(Caches(tmp_path)) == []


@pytest.mark.parametrize("change", ["delete", "update"])
def test_a_cache_that_leaves_ready_after_ranking_is_skipped(caches: Caches, monkeypatch: pytest.MonkeyPatch,
                                                             change: str) -> None:
    record(caches, "first", "team/app:1.0")
    record(caches, "second", "team/app:1.0", age_hours=1)
    real: Callable[..., Any] = matcher_module.rank_index
    calls = []

    def racing(*args: Any) -> list[Candidate]:
        found = real(*args)
        calls.append(len(found))
        # Between reading the index and taking the winner, it goes away or starts an update.
        if change == "delete":
            caches.delete("first")
        else:
            caches.change("first", lambda c: setattr(c, "phase", UPDATING))
        return found

    monkeypatch.setattr(matcher_module, "rank_index", racing)
    result = Matcher(caches).best(MatchRequest((img("team/app:1.0"),)))
    assert result.cache.name == "second" and names(result) == ["first", "second"]
    assert calls == [2]  # one read of the index
    if change == "update":
        assert caches.get("first").last_used is None


def test_when_every_ranked_cache_is_gone_the_index_is_read_again(caches: Caches,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    record(caches, "only", "team/app:1.0")
    real: Callable[..., Any] = matcher_module.rank_index
    calls = []

    def racing(*args: Any) -> list[Candidate]:
        found = real(*args)
        calls.append([c.entry.name for c in found])
        if len(calls) == 1:  # the only candidate starts an update; another cache becomes Ready
            caches.change("only", lambda c: setattr(c, "phase", UPDATING))
            record(caches, "late", "team/app:2.0")
        return found

    monkeypatch.setattr(matcher_module, "rank_index", racing)
    result = Matcher(caches).best(MatchRequest((img("team/app:1.0"),)))
    assert calls == [["only"], ["late"]] and result.cache.name == "late"


# -- requests from Pod and Deployment YAML ---------------------------------------------------------


def pod(containers: str, annotations: str = "", init: str = "", name: str = "web-1") -> Any:
    text = f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  {('annotations:' + annotations) if annotations else ''}
spec:
  {('initContainers:' + init) if init else ''}
  containers:{containers}
"""
    return yaml.safe_load(text)


def test_pod_images_storage_and_annotations() -> None:
    req = request_from_pod(pod("""
  - name: app
    image: registry.example.com:5000/team/app:1.0
    imagePullPolicy: IfNotPresent
    resources:
      requests: {ephemeral-storage: 30Gi}
  - name: sidecar
    image: registry.example.com:5000/team/proxy:2.1
    imagePullPolicy: IfNotPresent
    resources:
      limits: {ephemeral-storage: 500M}
""", annotations="""
    k8s.aliyun.com/eci-image-cache: "true"
    k8s.aliyun.com/eci-image-snapshot-id: imc-2ze5tm5gehgtiiga5zg4
"""))
    assert req.images == (img("team/app:1.0"), img("team/proxy:2.1"))
    assert req.storage_gib == 31  # 30 GiB + 500 MB rounded up: the containers run together
    assert req.auto_match is True and req.cache_id == "imc-2ze5tm5gehgtiiga5zg4"
    assert req.instance_id == "web-1" and req.warnings == ()


def test_pod_without_annotations_or_storage() -> None:
    req = request_from_pod(pod("\n  - {name: a, image: nginx:1.25, imagePullPolicy: IfNotPresent}"))
    assert req == MatchRequest(("nginx:1.25",), 0, None, False, "web-1")
    assert request_from_pod(pod("\n  - {name: a, image: nginx:1.25, imagePullPolicy: IfNotPresent}"),
                            instance_id="eci-9").instance_id == "eci-9"


def test_init_containers_count_for_images_and_storage() -> None:
    req = request_from_pod(pod("""
  - {name: app, image: team/app:1.0, imagePullPolicy: IfNotPresent,
     resources: {requests: {ephemeral-storage: 10Gi}}}
""", init="""
  - {name: migrate, image: team/migrate:1.0, imagePullPolicy: IfNotPresent,
     resources: {limits: {ephemeral-storage: 25Gi}}}
  - {name: again, image: team/app:1.0, imagePullPolicy: IfNotPresent}
"""))
    assert req.images == ("team/migrate:1.0", "team/app:1.0")  # init containers first, each image once
    assert req.storage_gib == 25  # an init container runs alone: the larger of it and the containers' sum


def test_deployment_takes_the_pod_template() -> None:
    doc = yaml.safe_load("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  template:
    metadata:
      labels: {app: web}
      annotations:
        k8s.aliyun.com/eci-image-cache: "true"
        k8s.aliyun.com/plain-http-registry: "registry.example.com:5000"
    spec:
      containers:
      - name: app
        image: registry.example.com:5000/team/app:1.0
        imagePullPolicy: IfNotPresent
        resources:
          requests: {ephemeral-storage: "21474836480"}
          limits: {ephemeral-storage: 30Gi}
""")
    req = request_from_pod(doc)
    assert req.images == (img("team/app:1.0"),) and req.storage_gib == 30  # the larger of request and limit
    assert req.auto_match and req.cache_id is None
    assert req.instance_id == "web"  # the template has no name: the workload's
    assert req.plain_http == (REG,)


def test_cronjob_takes_the_job_template() -> None:
    doc = {"kind": "CronJob", "metadata": {"name": "nightly"},
           "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [
               {"name": "job", "image": "team/job:1", "imagePullPolicy": "IfNotPresent"}]}}}}}}
    assert request_from_pod(doc).images == ("team/job:1",)


@pytest.mark.parametrize("quantity,gib", [("30Gi", 30), ("500M", 1), ("1e9", 1), ("21474836480", 20),
                                          (21474836480, 20), ("1.5Gi", 2), ("20Gi", 20), ("2Ti", 2048),
                                          ("1073741824", 1), ("1073741825", 2), ("0", 0), ("100Mi", 1),
                                          ("3E9", 3), ("250m", 1)])
def test_ephemeral_storage_quantities(quantity: Any, gib: int) -> None:
    req = request_from_pod(pod("\n  - name: a\n    image: team/app:1\n    imagePullPolicy: IfNotPresent\n"
                               f"    resources: {{requests: {{ephemeral-storage: {quantity!r}}}}}"))
    assert req.storage_gib == gib


def test_always_pull_policy_is_reported() -> None:
    req = request_from_pod(pod("""
  - {name: app, image: team/app:1.0, imagePullPolicy: Always}
  - {name: ok, image: team/ok:1.0, imagePullPolicy: IfNotPresent}
  - {name: latest, image: team/tool}
"""))
    assert req.images == ("team/app:1.0", "team/ok:1.0", "team/tool")  # Always still matches
    assert len(req.warnings) == 2
    assert "container app: imagePullPolicy Always" in req.warnings[0] and "IfNotPresent" in req.warnings[0]
    assert "container latest" in req.warnings[1] and ":latest" in req.warnings[1]


@pytest.mark.parametrize("doc,message", [
    ({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}, "spec.containers: the pod has no containers"),
    ({"kind": "Pod", "metadata": {"name": "p"}, "spec": {}}, "the pod has no containers"),
    ({"kind": "Pod", "spec": {"containers": [{"name": "app"}]}}, "spec.containers[0]: container app has no image"),
    ({"kind": "Pod", "spec": {"containers": [{"name": "app", "image": ""}]}}, "container app has no image"),
    ({"kind": "Pod", "spec": {"containers": [{"name": "app", "image": "Bad Image"}]}},
     "spec.containers[0].image: invalid image reference"),
    ({"kind": "Pod", "spec": {"containers": [{"name": "a", "image": "x:1", "resources": {
        "requests": {"ephemeral-storage": "lots"}}}]}},
     "spec.containers[0].resources.requests.ephemeral-storage: 'lots' is not a quantity"),
    ({"kind": "Pod", "spec": {"containers": [{"name": "a", "image": "x:1", "resources": {
        "limits": {"ephemeral-storage": "-1Gi"}}}]}}, "'-1Gi' is negative"),
    ({"kind": "Pod", "spec": {"containers": [{"name": "a", "image": "x:1", "resources": {
        "limits": {"ephemeral-storage": "10Gb"}}}]}}, "'10Gb' is not a quantity"),
    ({"kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": []}}, "kind 'Service' has no pod template"),
    ({"kind": "ConfigMap", "data": {}}, "kind 'ConfigMap' has no pod template"),
    (["not", "an", "object"], "not an object"),
    ({"kind": "Pod", "spec": {"containers": {"name": "a"}}}, "spec.containers: want a list"),
    ({"kind": "Pod", "spec": {"containers": ["x:1"]}}, "spec.containers[0]: want a container"),
    ({"kind": "Deployment", "spec": {"template": {"spec": {"initContainers": [{"image": "x:1"}]}}}},
     "spec.template.spec.containers: the pod has no containers"),
    ({"kind": "Pod", "metadata": {"annotations": {"k8s.aliyun.com/eci-image-cache": "yes"}},
      "spec": {"containers": [{"name": "a", "image": "x:1"}]}}, 'want "true" or "false"'),
    ({"kind": "Pod", "metadata": {"annotations": ["x"]}, "spec": {"containers": [{"name": "a", "image": "x:1"}]}},
     "metadata.annotations: want a mapping"),
])
def test_bad_pods_are_validation_errors(doc: Any, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        request_from_pod(doc)
    assert message in err.value.message


# -- the command, through click ------------------------------------------------------------------------


def invoke(home: Path, *args: str) -> Any:
    """Run the command as ``imc match`` would; ``code`` is the exit code imc's main
    gives (an ImcError escaping the command becomes its exit_code)."""
    result = CliRunner().invoke(match, list(args), obj=Context(home))
    result.code = result.exception.exit_code if isinstance(result.exception, ImcError) else result.exit_code
    return result


def test_cli_prints_the_choice_and_json(tmp_path: Path) -> None:
    caches = Caches(tmp_path)
    chosen = record(caches, "app", "team/app:1.0")
    out = invoke(tmp_path, "--image", img("team/app:1.0"))
    assert out.code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "CACHEID", "PHASE"] and lines[1].split() == ["app", chosen.id, "Ready"]
    assert lines[2].startswith("reason: 1 of 1 images with the same version")
    doc = json.loads(invoke(tmp_path, "--image", img("team/app:2.0"), "-o", "json").stdout)
    assert doc["cache"] == {"name": "app", "imageCacheId": chosen.id, "phase": "Ready"}
    assert doc["created"] is False and doc["warnings"] == []
    assert [c["name"] for c in doc["ranking"]] == ["app"] and doc["ranking"][0]["sameRepositoryImages"] == 1


def test_cli_no_match_exits_13_and_file_flags_override(tmp_path: Path) -> None:
    record(Caches(tmp_path), "app", "team/app:1.0", size=20)
    pod_file = tmp_path / "pod.yaml"
    pod_file.write_text(f"""apiVersion: v1
kind: Service
metadata: {{name: web}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1}}
spec:
  containers:
  - {{name: app, image: "{img('team/app:1.0')}", imagePullPolicy: Always,
      resources: {{requests: {{ephemeral-storage: 30Gi}}}}}}
""")
    out = invoke(tmp_path, "-f", str(pod_file))
    assert out.code == 13 and isinstance(out.exception, NoMatchError)
    assert "no Ready cache of at least 30 GiB" in out.exception.message
    assert "imc: warning: container app: imagePullPolicy Always" in out.stderr
    overridden = invoke(tmp_path, "-f", str(pod_file), "--storage", "20")
    assert overridden.code == 0 and overridden.stdout.splitlines()[1].split()[0] == "app"
    assert invoke(tmp_path).code == 2  # nothing to match


def test_cli_rejects_bad_files(tmp_path: Path) -> None:
    two = tmp_path / "two.yaml"
    two.write_text("kind: Pod\nspec: {containers: [{image: a:1}]}\n---\nkind: Pod\nspec: {containers: [{image: b:1}]}\n")
    out = invoke(tmp_path, "-f", str(two))
    assert isinstance(out.exception, ValidationError) and "holds 2 workloads" in out.exception.message
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Pod\nspec: {containers: []}\n")
    out = invoke(tmp_path, "-f", str(bad))
    assert isinstance(out.exception, ValidationError)
    assert out.exception.message == f"{bad}: spec.containers: the pod has no containers"
