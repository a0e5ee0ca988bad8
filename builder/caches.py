"""Image caches over time: create, update, delete, expire; the one door to the records.

``Caches`` ties the records (``builder.records``, which nothing else opens), the shared
store and the snapshot volumes together. Every reader and writer of a cache record
goes through it, so whatever it notices on the way (a builder that died) holds for
every process. The build itself, from Creating to Ready, is ``builder.build``.

Whoever builds a cache holds its ``BuildLease`` (an flock) until the build ends, so
a builder that dies is noticed by the next reader, which marks the cache Failed
(or UpdateFailed) instead of leaving it Creating forever.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

from builder.digest import Digest
from builder.errors import AlreadyExistsError, CacheStateError, CapacityError, NotFoundLocalError
from builder.home import Home, partial_of
from builder.imagecache import (
    A_FLASH,
    A_INSECURE,
    A_ON_DRIFT,
    A_PLAIN_HTTP,
    A_REUSE,
    BUILDING,
    CREATING,
    FAILED,
    FAILED_RETENTION,
    GIB,
    ID_PREFIX,
    READY,
    UPDATE_FAILED,
    UPDATING,
    AnnotationReport,
    CacheSpec,
    Event,
    ImageCache,
    ResolvedImage,
    Settings,
    VolumeInfo,
    new_cache_id,
    now_utc,
    parse_time,
    rfc3339,
    validate_name,
)
from builder.oci import Platform
from builder.pull import DEFAULT_CONCURRENCY
from builder.records import CacheDB, Ranked, TagResolution
from builder.registry.auth import SecretStore
from builder.retirement import Retirement, expired, expiring_soon, over_budget, warn_expiring
from builder.store import Store
from builder.units import human
from builder.volume import Volume

UNSET = object()
STALE = "the object has been modified; please apply your changes to the latest version and try again"
log = logging.getLogger(__name__)


class _Expired(Exception):
    """Raised inside a record transaction to leave it unchanged: the cache has expired."""


class BuildLease:
    """The exclusive right to build one cache: an flock the builder holds until done.

    It can be handed to a child process (``fileno`` in ``pass_fds``); the lock lives as
    long as any holder keeps the descriptor open, and dies with the last of them.

    gc removes the lock files of caches that no longer exist, holding the lock while it
    does; a lease is only taken on the file that is at ``path`` once locked, so nobody
    ever holds a lock on a removed file that others cannot see. ``wait`` blocks instead
    of failing when the lock is held (for a new cache's id, only gc can hold it).
    """

    def __init__(self, path: Path, wait: bool = False) -> None:
        self._fd: int | None = None
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise CacheStateError("a build of this image cache is still running") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)  # gc removed this file between our open and our lock: lock the new one

    @classmethod
    def adopt(cls, fd: int) -> BuildLease:
        """Take over a lease inherited as an open descriptor (the builder process)."""
        lease = cls.__new__(cls)
        lease._fd = fd
        return lease

    def fileno(self) -> int:
        assert self._fd is not None
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class ImportedVolume:
    """What ``Caches.import_volume`` needs from whoever wrote a verified volume: the
    images it serves, their unpacked size, and the ``Imported`` event's message."""

    images: list[ResolvedImage]
    unpacked_bytes: int
    note: str


@dataclass
class CachesGcReport:
    """What ``Caches.gc`` removed (or, dry, would remove): ``retired`` says why each
    deleted cache went; a dry run also lists each volume file and blob, with sizes."""

    deleted: list[str] = field(default_factory=list)
    volumes_removed: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    partials_removed: int = 0
    retired: list[Retirement] = field(default_factory=list)
    auto_bytes: int = 0  # what the automatic caches' volumes hold once gc is done
    volume_files: list[tuple[str, int]] = field(default_factory=list)
    blobs: list[tuple[str, int]] = field(default_factory=list)


class Caches:
    """Every image cache under one imc home."""

    def __init__(self, home: Path | Home, store: Store | None = None, clock: Callable[[], dt.datetime] = now_utc,
                 platform: Platform | None = None, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self.home = Home(home)
        self.store = store or Store(self.home)
        self._db = CacheDB(self.home.records)
        self.home.volumes.mkdir(parents=True, exist_ok=True)
        self.secrets = SecretStore(self.home.secrets)
        self.clock = clock
        self.platform = platform
        self.concurrency = concurrency

    @property
    def settings(self) -> Settings:
        return Settings.load(self.home.settings)

    def _lease_path(self, cache_id: str) -> Path:
        return self.home.cache_lock(cache_id)

    def change(self, name: str, change: Callable[[ImageCache], None],
               on_event: Callable[[Event], None] | None = None) -> ImageCache:
        """Apply ``change`` to a record in one transaction and return the result; the
        events it adds also go to ``on_event`` (whoever watches a build)."""
        before: list[int] = []

        def counted(cache: ImageCache) -> None:
            before.append(len(cache.events))
            change(cache)

        cache = self._db.update(name, counted)
        if on_event is not None:
            for event in cache.events[before[0]:]:
                on_event(event)
        return cache

    # -- reading: every record goes out through _current -----------------------------------

    def get(self, name: str) -> ImageCache:
        """A cache's record, after noticing a builder that died. A name that no cache can
        have is a ValidationError, checked before it is looked up; an expired cache is
        deleted now and is not found."""
        return self._current(self._db.get(validate_name(name)))

    def by_id(self, cache_id: str) -> ImageCache:
        return self._current(self._db.by_id(cache_id))

    def find(self, name_or_id: str) -> ImageCache:
        """A cache by its name or by its id (``imc-…``, as the console's id link names
        it). A name is looked up first: ids are valid names too, and a cache that
        has one as its name keeps it."""
        validate_name(name_or_id)
        try:
            return self.get(name_or_id)
        except NotFoundLocalError:
            pass
        if name_or_id.startswith(ID_PREFIX):
            try:
                return self.by_id(name_or_id)
            except NotFoundLocalError:
                pass
        raise NotFoundLocalError(f"image cache {name_or_id!r} does not exist (no cache has this name or id)")

    def list(self) -> list[ImageCache]:
        """Every cache that has not expired (the expired ones are deleted now)."""
        return self._sweep()[0]

    def exists(self, name: str) -> bool:
        """Whether a cache of this name exists (in any phase, and not expired)."""
        try:
            self.get(name)
        except NotFoundLocalError:
            return False
        return True

    def count(self, auto: bool) -> int:
        """How many automatic (or manual) caches exist: what their quota counts."""
        return sum(1 for c in self.list() if c.auto == auto)

    def expiry(self, cache: ImageCache, unused: dt.timedelta | None = None) -> dt.datetime | None:
        """When ``cache`` expires: the end of its retention (or 24 h after it failed),
        or for an automatic cache ``auto_unused_days`` after its last use, whichever
        comes first; None for never."""
        # An automatic cache has no retention: its stored date counts only once it failed
        # (the date shown for it otherwise is derived here, from its last use).
        expire = parse_time(cache.expire) if not cache.auto or cache.phase == FAILED else None
        if cache.auto:
            unused = unused if unused is not None else dt.timedelta(days=self.settings.auto_unused_days)
            last = parse_time(cache.last_used or cache.created)
            if last is not None:
                expire = min(expire, last + unused) if expire else last + unused
        return expire

    def _shown(self, cache: ImageCache, unused: dt.timedelta) -> ImageCache:
        """``cache`` as readers see it: an automatic cache's ``expire`` is the date it
        will expire (its last use plus ``auto_unused_days``), which moves with each use."""
        if cache.auto:
            cache.expire = rfc3339(self.expiry(cache, unused))
        return cache

    def _current(self, cache: ImageCache) -> ImageCache:
        if self._expire(cache, self.clock(), self._unused()):
            raise NotFoundLocalError(f"image cache {cache.name!r} does not exist (it expired at "
                                     f"{rfc3339(self.expiry(cache))} and is deleted)")
        return self._shown(self._reconcile(cache), self._unused())

    def _sweep(self) -> tuple[list[ImageCache], list[str]]:
        """The caches that have not expired, and the names of those deleted as expired."""
        now, unused = self.clock(), self._unused()
        live, deleted = [], []
        for cache in self._db.list():
            if self._expire(cache, now, unused):
                deleted.append(cache.name)
            else:
                live.append(self._shown(self._reconcile(cache), unused))
        return live, deleted

    def _unused(self) -> dt.timedelta:
        return dt.timedelta(days=self.settings.auto_unused_days)

    def _expire(self, cache: ImageCache, now: dt.datetime, unused: dt.timedelta) -> bool:
        """Delete ``cache`` if it has expired (whoever sees it first); True if it has."""
        expire = self.expiry(cache, unused)
        if expire is None or expire > now:
            return False
        try:
            self._delete(cache.name, cache.id)
        except NotFoundLocalError:
            return True  # another process saw it first
        log.info("image cache %s (%s) expired at %s: deleted", cache.name, cache.id, rfc3339(expire))
        return True

    def ranked(self, wanted: list[tuple[str, str]], min_size_gib: int, limit: int) -> list[Ranked]:
        """The matcher's ranking of the Ready caches for the wanted (repository,
        version) pairs, best first, done by SQLite on the records' match index."""
        return self._db.rank(wanted, min_size_gib, limit)

    def revision(self) -> int:
        """A number that changes with every write to any record (a cache's
        ``resource_version`` is its value at that cache's last write): what a watcher polls."""
        return self._db.revision()

    def _reconcile(self, cache: ImageCache) -> ImageCache:
        if cache.phase not in BUILDING and cache.volume_state != "packing":
            return cache
        try:
            lease = BuildLease(self._lease_path(cache.id))
        except CacheStateError:
            return cache  # its builder is alive
        try:
            return self.fail(cache.name, "the build process ended before finishing (killed or crashed)")
        except NotFoundLocalError:
            return cache
        finally:
            lease.release()

    # -- create, update, delete ------------------------------------------------------------

    def create(self, name: str, spec: CacheSpec, *, auto: bool = False, instance_id: str | None = None,
               no_effect: AnnotationReport | None = None) -> tuple[ImageCache, BuildLease]:
        """Validate and record a new cache in phase Creating; the caller then builds it
        with the returned lease (in this process, a thread, or a child process)."""
        validate_name(name)
        spec = spec.validated()
        for secret in spec.image_pull_secrets:
            self.secrets.load(secret)  # missing or unsafe secrets fail now, not mid-build
        now = self.clock()
        cache = ImageCache(name=name, id=new_cache_id(), spec=spec, created=rfc3339(now),  # type: ignore[arg-type]
                           start_time=rfc3339(now), auto=auto, instance_id=instance_id)
        kind = "automatic image cache" if auto else "image cache"
        cache.event("Creating", f"{kind} {name} created: {len(spec.images)} images, {spec.size_gib} GiB"
                    f"{', reuse' if spec.reuse else ''}{', flash' if spec.flash else ''}", when=now)
        if no_effect is not None:
            no_effect.record(cache, now)
        cache.expire = cache.retention_expiry()
        settings = self.settings
        self._sweep()  # an expired cache holds neither its name nor a place in the quota
        lease = BuildLease(self._lease_path(cache.id), wait=True)
        try:
            self._db.insert(cache, settings.max_auto_caches if auto else settings.max_manual_caches)
        except BaseException:
            lease.release()
            raise
        return cache, lease

    def update(self, name: str, images: list[str] | None = None, retention_days: object = UNSET,
               plain_http: list[str] | None = None, insecure: list[str] | None = None,
               pull_secrets: list[str] | None = None, size_gib: int | None = None, reuse: bool | None = None,
               flash: bool | None = None, annotations: dict[str, str] | None = None,
               resource_version: int | None = None, on_drift: str | None = None) -> tuple[ImageCache, BuildLease | None]:
        """Change some fields of a Ready (or UpdateFailed) cache, the others kept; see
        ``update_spec``."""
        current = self.get(name)
        spec = replace(
            current.spec,
            images=images if images is not None else current.spec.images,
            retention_days=current.spec.retention_days if retention_days is UNSET else retention_days,
            plain_http=plain_http if plain_http is not None else current.spec.plain_http,
            insecure=insecure if insecure is not None else current.spec.insecure,
            image_pull_secrets=pull_secrets if pull_secrets is not None else current.spec.image_pull_secrets,
            annotations=annotations if annotations is not None else current.spec.annotations,
            size_gib=size_gib if size_gib is not None else current.spec.size_gib,
            reuse=reuse if reuse is not None else current.spec.reuse,
            flash=flash if flash is not None else current.spec.flash,
            on_drift=on_drift if on_drift is not None else current.spec.on_drift,
        )
        return self.update_spec(name, spec, resource_version)

    def plan_update(self, name: str, spec: CacheSpec, provided: Collection[str] = ()) -> UpdatePlan:
        """What ``update_spec(name, spec)`` would change, field by field, and whether it
        rebuilds; raises what it would refuse. Writes nothing (``imc apply --dry-run``).
        The pull secrets named in ``provided`` count as present: the same file stores
        them before the update runs."""
        current = self.get(name)
        if current.phase not in (READY, UPDATE_FAILED):
            raise CacheStateError(f"image cache {name} is {current.phase}: updates are allowed only in "
                                  f"{READY} or {UPDATE_FAILED}")
        spec = spec.validated()
        for secret in spec.image_pull_secrets:
            if secret not in provided:
                self.secrets.load(secret)
        changes = spec_changes(current.spec, spec)
        resize = spec.size_gib != current.spec.size_gib
        if resize and spec.images == current.spec.images and current.unpacked_bytes > spec.size_gib * GIB:
            raise CapacityError(f"imageCacheSize: {spec.size_gib} GiB is less than the "
                                f"{current.unpacked_bytes / GIB:.2f} GiB the images of {name} need unpacked; "
                                "the cache is unchanged")
        # Rebuild for new images, a new size (a volume of that size), after a failed
        # update, or when the volume is missing (a flash cache whose packing was
        # interrupted): an update with no changes repairs.
        rebuild = None
        if spec.images != current.spec.images:
            rebuild = f"rebuilding with {len(spec.images)} images"
        elif resize:
            rebuild = f"re-packing into a volume of {spec.size_gib} GiB"
        elif current.phase == UPDATE_FAILED or current.volume_state != "ready":
            rebuild = f"rebuilding with {len(spec.images)} images"
        elif current.stale:
            rebuild = f"rebuilding: the tags of {', '.join(sorted(current.moved_tags))} moved since the last build"
        return UpdatePlan(current, spec, changes, rebuild)

    def update_spec(self, name: str, spec: CacheSpec,
                    resource_version: int | None = None) -> tuple[ImageCache, BuildLease | None]:
        """Make a Ready (or UpdateFailed) cache's spec ``spec``: every changed field takes
        effect, or the update is refused and nothing changes. New images or a new size
        need a rebuild: the cache goes Updating and the caller builds it with the
        returned lease, while the previous volume (or flash staging copy) keeps serving
        until the new one is packed. A size the current images do not fit is refused
        (CapacityError). ``resource_version``: change it only if no write came after
        that version (else CacheStateError)."""
        plan = self.plan_update(name, spec)
        lease = BuildLease(self._lease_path(plan.current.id)) if plan.rebuild else None
        said = "; ".join(f"{what}: {shown_value(old)} -> {shown_value(new)}" for what, old, new in plan.changes)

        def apply(cache: ImageCache) -> None:
            if resource_version is not None and cache.resource_version != resource_version:
                raise CacheStateError(STALE)
            if cache.phase not in (READY, UPDATE_FAILED):
                raise CacheStateError(f"image cache {name} is {cache.phase}: updates are allowed only in "
                                      f"{READY} or {UPDATE_FAILED}")
            cache.spec = plan.spec
            cache.expire = cache.retention_expiry()
            if plan.rebuild:
                cache.enter(UPDATING)
                cache.message = ""
                cache.event("Updating", plan.rebuild + (f" ({said})" if said else ""))
            elif said:
                cache.event("Updated", f"{said}; no rebuild needed")

        try:
            return self.change(name, apply), lease
        except BaseException:
            if lease:
                lease.release()
            raise

    def delete(self, name: str) -> ImageCache:
        """Delete a cache in any phase; its volume goes now, its blobs at the next gc."""
        return self._delete(validate_name(name))

    def _delete(self, name: str, cache_id: str | None = None) -> ImageCache:
        """Delete the record (only if its id is still ``cache_id``, when given: a cache
        created again under the name is another cache), then its volume files."""
        cache = self._db.delete(name, cache_id)
        for path in self.home.volumes_of(cache.id):
            path.unlink(missing_ok=True)
        return cache

    def mark_used(self, name: str, hits: int = 1, when: dt.datetime | None = None) -> ImageCache:
        """Record ``hits`` served hits, the last at ``when`` (default: now): ``imc serve``
        writes them in batches. ``lastUsedTime`` moves to ``when`` unless a later use is
        recorded, ``hitCount`` adds up; a status write, so the spec's generation stays
        (``resourceVersion`` moves, as with any write). A cache that had expired by
        ``when`` is not revived but deleted, and is not found."""
        return self._use(name, ready=False, when=when, hits=hits)

    def take(self, name: str) -> ImageCache:
        """Mark a cache used if it is Ready, in one transaction: for a choice made from
        the match index, which is read outside it (the cache may have started an update
        since). CacheStateError if it is not Ready; NotFoundLocalError if it is gone
        or expired (then deleted)."""
        return self._use(name, ready=True)

    def _use(self, name: str, ready: bool, when: dt.datetime | None = None, hits: int = 0) -> ImageCache:
        now, unused = self.clock(), self._unused()
        when = min(when or now, now)
        expired: list[ImageCache] = []

        def use(cache: ImageCache) -> None:
            expire = self.expiry(cache, unused)
            if expire is not None and expire <= when:
                expired.append(cache)
                raise _Expired
            if ready and cache.phase != READY:
                raise CacheStateError(f"image cache {cache.name} ({cache.id}) is {cache.phase}, not Ready")
            # One notion of the last use, whoever records it (a match, a batch of hits):
            # it only moves forward.
            cache.last_used = max(cache.last_used or "", rfc3339(when) or "")
            cache.hit_count += hits
            warn_expiring(cache, now)

        try:
            return self._shown(self._db.update(name, use), unused)
        except _Expired:
            self._expire(expired[0], now, unused)
            raise NotFoundLocalError(f"image cache {name!r} does not exist (it expired and is deleted)") from None

    def record_resolution(self, registry: str, repository: str, tag: str, digest: Digest, media_type: str) -> None:
        """Remember what an upstream answered for a tag just now (``imc serve --pull-through``)."""
        self._db.record_resolution(TagResolution(registry, repository, tag, str(digest), media_type,
                                                 rfc3339(self.clock()) or ""))

    def resolution(self, registry: str | None, repository: str, tag: str) -> TagResolution | None:
        """The last digest pull-through resolved for a tag at ``registry`` (None: any upstream)."""
        return self._db.resolution(registry, repository, tag)

    def import_volume(self, name: str, spec: CacheSpec, write: Callable[[Path], ImportedVolume],
                      cache_id: str | None = None) -> ImageCache:
        """Register a Ready cache whose volume comes whole from elsewhere (an artifact pull).

        The name must be free; it is checked before ``write`` runs, so nothing is
        fetched for a name that cannot be used. The id is ``cache_id`` when this home
        does not use it yet (so a pod that names the cache by id finds it on every
        node), else a new one. ``write(partial)`` writes the volume at ``partial`` and
        verifies it; the volume then takes its final name and the record is inserted.
        Nothing is left behind on failure: no record, no partial or final file. The
        cache's lease is held throughout, so gc leaves the files alone.
        """
        validate_name(name)
        if self.exists(name):
            raise AlreadyExistsError(f"name {name!r}: an image cache with this name already exists")
        if cache_id is None or self._id_taken(cache_id):
            cache_id = new_cache_id()
        try:
            lease = BuildLease(self._lease_path(cache_id))
        except CacheStateError:
            raise CacheStateError(f"image cache id {cache_id} is being imported or built by another process") from None
        generation = 1
        final = self.home.volume(cache_id, generation)
        partial = partial_of(final)
        try:
            imported = write(partial)
            os.replace(partial, final)
            volume = Volume.open(final)
            stamp = rfc3339(self.clock()) or ""
            cache = ImageCache(
                name=name, id=cache_id, spec=spec, created=stamp, phase=READY, progress=100, start_time=stamp,
                last_updated=stamp, images=imported.images, volume_state="ready", generation=generation,
                volume=VolumeInfo(str(final), volume.content_bytes, volume.blob_bytes, volume.capacity, generation),
                unpacked_bytes=imported.unpacked_bytes, events=[Event(stamp, "Normal", "Imported", imported.note)])
            cache.expire = cache.retention_expiry()
            self._db.insert(cache, self.settings.max_manual_caches)
        except BaseException:
            partial.unlink(missing_ok=True)
            if not self._volume_of(name, final):
                final.unlink(missing_ok=True)
            raise
        finally:
            lease.release()
        return self.get(name)

    def _id_taken(self, cache_id: str) -> bool:
        try:
            self._db.by_id(cache_id)
        except NotFoundLocalError:
            return False
        return True

    def _volume_of(self, name: str, path: Path) -> bool:
        """Whether the cache ``name`` exists and is served from the volume at ``path``."""
        try:
            found = self._db.get(name)
        except NotFoundLocalError:
            return False
        return found.volume is not None and Path(found.volume.path) == path

    def fail(self, name: str, reason: str, fatal: bool = False,
             on_event: Callable[[Event], None] | None = None) -> ImageCache:
        """Record a failed build in the phase it deserves, keeping what still serves.

        ``fatal`` failures (the images do not fit) fail a flash cache that was already
        usable from staging: it could never be packed.
        """
        now = self.clock()

        def failed(c: ImageCache) -> None:
            c.message = reason
            if c.phase == CREATING or (fatal and c.phase == READY and c.volume_state == "packing"):
                c.volume_state = "none" if c.volume is None else c.volume_state
                c.enter(FAILED, now)
                c.pinned = []
                c.expire = rfc3339(now + FAILED_RETENTION)
                c.event("Failed", reason, "Warning", when=now)
            elif c.phase == UPDATING:
                c.enter(UPDATE_FAILED, now)
                c.pinned = [i for i in c.pinned if i in c.images] if c.source == "staging" else []
                c.event("UpdateFailed", f"{reason}; the previous content still serves", "Warning", when=now)
            elif c.volume_state == "packing":
                c.volume_state = "failed"
                c.event("VolumePackFailed", f"{reason}; still serving from local staging", "Warning", when=now)

        return self.change(name, failed, on_event)

    # -- expiry and reclaiming --------------------------------------------------------------

    def gc(self, dry_run: bool = False) -> CachesGcReport:
        """Delete expired caches (retention over, failed 24 h ago, automatic and unused
        too long) and the automatic caches over the byte budget, warn of retentions
        that end soon on caches still in use, then reclaim every blob and volume file
        that nothing needs. ``dry_run``: work out the same, and change nothing."""
        if dry_run:
            return self._gc_plan()
        report = CachesGcReport()
        now, unused = self.clock(), self._unused()
        records = self._db.list()
        live, report.deleted = self._sweep()
        report.retired = [expired(c, self.expiry(c, unused) or now, self.settings.auto_unused_days)
                          for c in records if c.name in report.deleted]
        gone, report.auto_bytes = self._enforce_budget(live, now)
        report.retired += gone
        report.deleted += [r.name for r in report.retired if r.name not in report.deleted]
        for cache in live:
            if cache.name not in report.deleted:
                self._warn_expiring(cache, now)
        # Blobs pull-through fetched on their own are kept like automatic caches: until unused that long.
        store_report = self.store.gc(pinned=self._pinned, pulled_since=(now - unused).timestamp())
        report.blobs_removed = store_report.blobs_removed
        report.bytes_freed = store_report.bytes_freed
        report.partials_removed = store_report.partials_removed
        report.volumes_removed = self._remove_orphan_volumes()
        return report

    def enforce_budget(self) -> list[Retirement]:
        """Delete automatic caches, least recently used first, until they hold no more
        than ``auto_max_bytes`` (or none may go); what went, and why."""
        return self._enforce_budget(self._sweep()[0], self.clock())[0]

    def _enforce_budget(self, live: list[ImageCache], now: dt.datetime) -> tuple[list[Retirement], int]:
        """The caches deleted for the budget, and the bytes the automatic caches hold after."""
        victims, left = over_budget(live, self.settings.auto_max_bytes, now)
        gone = []
        for victim in victims:
            try:
                self._delete(victim.name, victim.id)
            except NotFoundLocalError:
                continue  # deleted by another process meanwhile
            log.info("automatic image cache %s (%s, %s) deleted: %s", victim.name, victim.id, human(victim.bytes),
                     victim.reason)
            gone.append(victim)
        if left > self.settings.auto_max_bytes > 0:
            log.warning("automatic image caches hold %s, over auto_max_bytes (%s): the rest were used within the "
                        "last hour or are being built", human(left), human(self.settings.auto_max_bytes))
        return gone, left

    def _warn_expiring(self, cache: ImageCache, now: dt.datetime) -> None:
        """Record the ``ExpiringSoon`` warning on a cache that is due one (a write only then)."""
        if not expiring_soon(cache, now):
            return

        def warn(c: ImageCache) -> None:
            if c.id == cache.id:
                warn_expiring(c, now)

        try:
            self.change(cache.name, warn)
        except NotFoundLocalError:
            pass

    def _gc_plan(self) -> CachesGcReport:
        """What ``gc`` would delete now, and why, reading only: expired caches, the
        automatic caches over the budget, orphan volume files, unneeded blobs."""
        now, unused = self.clock(), self._unused()
        report = CachesGcReport()
        records = self._db.list()
        live = []
        for cache in records:
            expire = self.expiry(cache, unused)
            if expire is not None and expire <= now:
                report.retired.append(expired(cache, expire, self.settings.auto_unused_days))
            else:
                live.append(cache)
        victims, report.auto_bytes = over_budget(live, self.settings.auto_max_bytes, now)
        report.retired += victims
        report.deleted = [r.name for r in report.retired]
        kept = [c for c in records if c.name not in report.deleted]
        for path in self._orphan_volumes(records):
            try:
                report.volume_files.append((str(path), path.lstat().st_size))  # never through a link
            except FileNotFoundError:
                continue  # removed since it was listed
        report.volumes_removed = len(report.volume_files)
        unneeded = self.store.unneeded(self._pinned_by(kept), pulled_since=(now - unused).timestamp())
        report.blobs = [(str(digest), size) for digest, size in unneeded]
        report.blobs_removed = len(report.blobs)
        report.bytes_freed = sum(size for _, size in unneeded)
        return report

    def _orphan_volumes(self, records: list[ImageCache]) -> list[Path]:
        """Volume files no record in ``records`` points at, but those of a build under
        way (``_remove_orphan_volumes`` finds their lease held)."""
        serving = {Path(c.volume.path) for c in records if c.volume is not None}
        building = {c.id for c in records if c.phase in BUILDING or c.volume_state == "packing"}
        return sorted(path for path, cache_id in self.home.volume_files().items()
                      if path not in serving and cache_id not in building)

    def _pinned(self) -> set[Digest]:
        return self._pinned_by(self._db.list())

    @staticmethod
    def _pinned_by(records: list[ImageCache]) -> set[Digest]:
        out: set[Digest] = set()
        for cache in records:
            for image in cache.pinned:
                out.add(Digest.parse(image.digest))
                if image.index:
                    out.add(Digest.parse(image.index))
        return out

    def _remove_orphan_volumes(self) -> int:
        """Volume files no record points at, and lock files of caches that no longer
        exist, when no builder holds them. Each is checked against the record again once
        the cache's lease is held: a build that finished, or a cache that was created,
        after the records were first read keeps its files."""
        records = {c.id: c for c in self._db.list()}
        removed = 0

        def wanted(cache_id: str, path: Path | None) -> bool:
            try:
                cache = self._db.by_id(cache_id)
            except NotFoundLocalError:
                return False
            return path is None or (cache.volume is not None and Path(cache.volume.path) == path)

        for path, cache_id in self.home.volume_files().items():
            cache = records.get(cache_id)
            if cache and cache.volume and Path(cache.volume.path) == path:
                continue
            try:
                lease = BuildLease(self._lease_path(cache_id))
            except CacheStateError:
                continue  # being built right now
            try:
                if not wanted(cache_id, path):
                    path.unlink(missing_ok=True)
                    removed += 1
            finally:
                lease.release()
        for cache_id, lock in self.home.cache_locks().items():
            if cache_id in records:
                continue
            try:
                lease = BuildLease(lock)
            except CacheStateError:
                continue  # held: a build (of a cache created since the records were read)
            try:
                if not wanted(cache_id, None):
                    lock.unlink(missing_ok=True)
            finally:
                lease.release()
        return removed


@dataclass(frozen=True)
class UpdatePlan:
    """An update worked out before anything is written: the record as it is, the spec
    it would get, each changed field (name, old, new), and why it rebuilds (None: it
    does not)."""

    current: ImageCache
    spec: CacheSpec
    changes: list[tuple[str, object, object]]
    rebuild: str | None


# Spec fields as the ImageCache object names them (annotations for the imc-only ones).
_FIELDS = (("images", "images"), ("image_pull_secrets", "imagePullSecrets"), ("size_gib", "imageCacheSize"),
           ("retention_days", "retentionDays"), ("reuse", A_REUSE), ("flash", A_FLASH),
           ("plain_http", A_PLAIN_HTTP), ("insecure", A_INSECURE), ("on_drift", A_ON_DRIFT))


def spec_changes(old: CacheSpec, new: CacheSpec) -> list[tuple[str, object, object]]:
    """Every field that differs between two specs, as (field, old, new); other
    annotations (recorded, with no effect here) each as ``annotation KEY``."""
    out: list[tuple[str, object, object]] = [
        (shown, getattr(old, attr), getattr(new, attr)) for attr, shown in _FIELDS
        if getattr(old, attr) != getattr(new, attr)]
    mapped = {shown for _, shown in _FIELDS}
    for key in sorted(set(old.annotations) | set(new.annotations)):
        if key not in mapped and old.annotations.get(key) != new.annotations.get(key):
            out.append((f"annotation {key}", old.annotations.get(key), new.annotations.get(key)))
    return out


def shown_value(value: object) -> str:
    """A spec value as ``spec_changes`` reports it to people."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)
