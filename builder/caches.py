"""Image caches over time: create, build, update, delete, expire.

``Caches`` ties the records (imagecache), the shared store (store, pull) and the
snapshot volumes (volume) together. A build goes:

    Creating ─ pull every image into the store (pinned by the record, so gc keeps it)
             ─ check the unpacked size against the cache's size
             ─ [flash: Ready now, served from the store's staging copy]
             ─ pack the volume ─ Ready, served from the volume, store pin released

Whoever builds a cache holds its ``BuildLease`` (an flock) until the build ends, so
a builder that dies is noticed by the next reader, which marks the cache Failed
(or UpdateFailed) instead of leaving it Creating forever.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from builder import faults
from builder import volume as volumes
from builder.digest import Digest
from builder.errors import CacheStateError, CapacityError, ImcError, NotFoundLocalError
from builder.home import Home
from builder.imagecache import (
    BUILDING,
    CREATING,
    FAILED,
    FAILED_RETENTION,
    GIB,
    READY,
    UPDATE_FAILED,
    UPDATING,
    AnnotationReport,
    CacheDB,
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
from builder.oci import Descriptor, Index, Platform
from builder.pull import (
    DEFAULT_CONCURRENCY,
    BlobDone,
    BlobProgress,
    ImageResolved,
    PulledImage,
    Puller,
    PullEvent,
    PullPlanned,
)
from builder.reference import parse as parse_reference
from builder.registry.auth import Keychain, SecretStore
from builder.registry.hosts import HostPolicy
from builder.registry.retry import RetryPolicy
from builder.store import Store
from builder.volume import PackProgress, Volume

UNSET = object()
STALE = "the object has been modified; please apply your changes to the latest version and try again"


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


class VolumeSource:
    """Another cache's volume as a place to copy blobs from (the reuse option)."""

    def __init__(self, cache: str, vol: Volume) -> None:
        self.name = f"cache:{cache}"
        self.volume = vol

    def open_blob(self, digest: Digest) -> BinaryIO | None:
        return self.volume.open_blob(digest) if self.volume.has(digest) else None


@dataclass
class CachesGcReport:
    """What ``Caches.gc`` removed."""

    deleted: list[str] = field(default_factory=list)
    volumes_removed: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    partials_removed: int = 0


class _BuildProgress:
    """Turns pull events into cache progress and events.

    Events are written as they happen; progress alone at most every ``SAVE_EVERY``
    seconds, since each write is a database transaction taken on a download thread.
    """

    SAVE_EVERY = 0.5

    def __init__(self, caches: Caches, name: str, span: tuple[int, int],
                 forward: Callable[[PullEvent], None] | None) -> None:
        self.caches, self.name = caches, name
        self.low, self.high = span
        self.forward = forward
        self.total = 0
        self.done = 0
        self.saved = -1
        self.saved_at = 0.0
        self.lock = threading.Lock()

    def __call__(self, ev: PullEvent) -> None:
        if self.forward:
            self.forward(ev)
        with self.lock:
            event: tuple[str, str] | None = None
            if isinstance(ev, PullPlanned):
                self.total = ev.size
                return
            if isinstance(ev, ImageResolved):
                event = ("ImageResolved", f"{ev.image} resolved to {ev.digest}")
            elif isinstance(ev, BlobProgress):
                self.done += ev.delta
            elif isinstance(ev, BlobDone):
                if ev.reused:
                    self.done += ev.size
                    what = "already in the store" if ev.origin == "store" else f"copied from {ev.origin}"
                    event = ("LayerReused", f"blob {ev.digest} ({ev.size} bytes) reused: {what}")
                else:
                    event = ("LayerFetched", f"blob {ev.digest} ({ev.size} bytes) fetched from the registry")
            else:
                return
            percent = self.low + (self.high - self.low) * self.done // max(self.total, 1)
            now = time.monotonic()
            if event is None and (percent <= self.saved or now - self.saved_at < self.SAVE_EVERY):
                return
            self.saved, self.saved_at = max(self.saved, percent), now

            def apply(c: ImageCache) -> None:
                if event is not None:
                    c.event(*event)
                c.set_progress(percent)

            self.caches._record(self.name, apply)


class Caches:
    """Every image cache under one imc home."""

    def __init__(self, home: Path | Home, store: Store | None = None, clock: Callable[[], dt.datetime] = now_utc,
                 platform: Platform | None = None, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self.home = Home(home)
        self.store = store or Store(self.home)
        self.db = CacheDB(self.home.records)
        self.home.volumes.mkdir(parents=True, exist_ok=True)
        self.secrets = SecretStore(self.home.secrets)
        self.clock = clock
        self.platform = platform
        self.concurrency = concurrency
        self._listeners: dict[str, Callable[[Event], None]] = {}

    @property
    def settings(self) -> Settings:
        return Settings.load(self.home.settings)

    def _lease_path(self, cache_id: str) -> Path:
        return self.home.cache_lock(cache_id)

    def _record(self, name: str, change: Callable[[ImageCache], None]) -> ImageCache:
        """Change a record; new events also go to whoever watches this build."""
        before: list[int] = []

        def counted(cache: ImageCache) -> None:
            before.append(len(cache.events))
            change(cache)

        cache = self.db.update(name, counted)
        listener = self._listeners.get(name)
        if listener is not None:
            for event in cache.events[before[0]:]:
                listener(event)
        return cache

    # -- reading -----------------------------------------------------------------------

    def get(self, name: str) -> ImageCache:
        """A cache's record, after noticing a builder that died. A name that no cache can
        have is a ValidationError, checked before it is looked up."""
        return self._reconcile(self.db.get(validate_name(name)))

    def by_id(self, cache_id: str) -> ImageCache:
        return self._reconcile(self.db.by_id(cache_id))

    def list(self) -> list[ImageCache]:
        return [self._reconcile(c) for c in self.db.list()]

    def revision(self) -> int:
        """A number that changes with every write to any record (a cache's
        ``resource_version`` is its value at that cache's last write): what a watcher polls."""
        return self.db.revision()

    def _reconcile(self, cache: ImageCache) -> ImageCache:
        if cache.phase not in BUILDING and cache.volume_state != "packing":
            return cache
        try:
            lease = BuildLease(self._lease_path(cache.id))
        except CacheStateError:
            return cache  # its builder is alive
        try:
            return self._fail(cache.name, "the build process ended before finishing (killed or crashed)")
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
        lease = BuildLease(self._lease_path(cache.id), wait=True)
        try:
            self.db.insert(cache, settings.max_auto_caches if auto else settings.max_manual_caches)
        except BaseException:
            lease.release()
            raise
        return cache, lease

    def update(self, name: str, images: list[str] | None = None, retention_days: object = UNSET,
               plain_http: list[str] | None = None, insecure: list[str] | None = None,
               pull_secrets: list[str] | None = None, annotations: dict[str, str] | None = None,
               resource_version: int | None = None) -> tuple[ImageCache, BuildLease | None]:
        """Change a Ready (or UpdateFailed) cache. A change of images needs a rebuild:
        the cache goes Updating and the caller builds it with the returned lease, while
        the previous volume (or flash staging copy) keeps serving. ``resource_version``:
        change it only if no write came after that version (else CacheStateError)."""
        current = self.get(name)
        if current.phase not in (READY, UPDATE_FAILED):
            raise CacheStateError(f"image cache {name} is {current.phase}: updates are allowed only in "
                                  f"{READY} or {UPDATE_FAILED}")
        spec = replace(
            current.spec,
            images=images if images is not None else current.spec.images,
            retention_days=current.spec.retention_days if retention_days is UNSET else retention_days,
            plain_http=plain_http if plain_http is not None else current.spec.plain_http,
            insecure=insecure if insecure is not None else current.spec.insecure,
            image_pull_secrets=pull_secrets if pull_secrets is not None else current.spec.image_pull_secrets,
            annotations=annotations if annotations is not None else current.spec.annotations,
        ).validated()
        for secret in spec.image_pull_secrets:
            self.secrets.load(secret)
        # Rebuild for new images, after a failed update, or when the volume is missing
        # (a flash cache whose packing was interrupted): an update with no changes repairs.
        rebuild = (spec.images != current.spec.images or current.phase == UPDATE_FAILED
                   or current.volume_state != "ready")
        lease = BuildLease(self._lease_path(current.id)) if rebuild else None

        def apply(cache: ImageCache) -> None:
            if resource_version is not None and cache.resource_version != resource_version:
                raise CacheStateError(STALE)
            if cache.phase not in (READY, UPDATE_FAILED):
                raise CacheStateError(f"image cache {name} is {cache.phase}: updates are allowed only in "
                                      f"{READY} or {UPDATE_FAILED}")
            cache.spec = spec
            cache.expire = cache.retention_expiry()
            if rebuild:
                cache.enter(UPDATING)
                cache.message = ""
                cache.event("Updating", f"rebuilding with {len(spec.images)} images")
            else:
                cache.event("Updated", "settings changed; no rebuild needed")

        try:
            return self._record(name, apply), lease
        except BaseException:
            if lease:
                lease.release()
            raise

    def delete(self, name: str) -> ImageCache:
        """Delete a cache in any phase; its volume goes now, its blobs at the next gc."""
        cache = self.db.delete(validate_name(name))
        for path in self.home.volumes_of(cache.id):
            path.unlink(missing_ok=True)
        return cache

    def mark_used(self, name: str) -> ImageCache:
        """Record a hit (automatic caches expire when unused)."""
        now = rfc3339(self.clock())
        return self.db.update(name, lambda c: setattr(c, "last_used", now))

    # -- building --------------------------------------------------------------------------

    def build(self, name: str, lease: BuildLease, on_pull: Callable[[PullEvent], None] | None = None,
              on_event: Callable[[Event], None] | None = None, timeout: float | None = None) -> ImageCache:
        """Run the build of a cache in Creating or Updating, then release the lease.

        Never raises for a build failure: the failure is the cache's new phase, with an
        event saying why. ``on_event`` sees each cache event as it is recorded. The pull
        gives up after ``timeout`` seconds (default: the ``pull_timeout_seconds`` setting).
        Returns the final record.
        """
        if on_event is not None:
            self._listeners[name] = on_event
        try:
            self._build(name, on_pull, self.settings.retry_policy(timeout))
        except NotFoundLocalError:
            pass  # deleted while building: nothing left to report to
        except (ImcError, OSError) as e:
            self._fail(name, getattr(e, "message", None) or f"{type(e).__name__}: {e}",
                       fatal=isinstance(e, CapacityError))
        except BaseException:
            self._fail(name, "the build was interrupted")
            raise
        finally:
            lease.release()
            self._listeners.pop(name, None)
        return self.db.get(name)

    def _build(self, name: str, on_pull: Callable[[PullEvent], None] | None, retry: RetryPolicy) -> None:
        cache = self.db.get(name)
        if cache.phase not in BUILDING:
            raise CacheStateError(f"image cache {name} is {cache.phase}: nothing to build")
        spec = cache.spec
        keychain = Keychain([self.secrets.load(s) for s in spec.image_pull_secrets])
        policy = HostPolicy(frozenset(spec.plain_http), frozenset(spec.insecure))
        sources = self._reuse_sources(name) if spec.reuse else []
        # Flash makes a new cache usable from staging; an update keeps serving the old
        # volume until the new one is packed, so it has nothing to gain from it.
        early = spec.flash and cache.phase == CREATING
        span = (5, 90) if early else (5, 80)
        puller = Puller(self.store, policy, keychain, self.platform, self.concurrency,
                        on_event=_BuildProgress(self, name, span, on_pull), retry=retry, sources=sources)
        self._record(name, lambda c: c.event("Pulling", f"pulling {len(spec.images)} images"))
        with self.store.pinning():
            result = puller.pull([parse_reference(i) for i in spec.images], record=False)
            resolved = [self._resolved(img) for img in result.images]

            def staged(c: ImageCache) -> None:
                c.pinned = _union(c.pinned, resolved)
                c.bytes_fetched = result.bytes_fetched
                c.bytes_reused = result.bytes_reused
                c.event("ImagesPulled", f"{len(resolved)} images local and verified: fetched "
                        f"{result.bytes_fetched} bytes in {result.blobs_fetched} blobs, reused "
                        f"{result.bytes_reused} bytes in {result.blobs_reused} blobs")

            self._record(name, staged)
        faults.checkpoint("pulled")
        capacity = spec.size_gib * GIB
        blobs = self._blobs(resolved)
        if early:
            # Usable now if the layers' own size headers fit; the exact count follows.
            declared = sum(self.store.declared_unpacked_size(b) for b in blobs)
            self._check_capacity(declared, spec.size_gib)

            def flash_ready(c: ImageCache) -> None:
                c.images = resolved
                c.enter(READY)
                c.volume_state = "packing"
                c.event("FlashReady", "usable now from local staging; packing the volume in the background")

            self._record(name, flash_ready)
            faults.checkpoint("flash-ready")
        # Count up to twice the size: enough to say how much is needed, while a
        # decompression bomb costs at most that much work.
        unpacked = self._unpacked_size(blobs, 2 * capacity)
        self._check_capacity(unpacked, spec.size_gib)

        def checked(c: ImageCache) -> None:
            c.unpacked_bytes = unpacked
            c.set_progress(span[1])
            c.event("CapacityChecked", f"{unpacked} bytes unpacked fit {spec.size_gib} GiB")

        cache = self._record(name, checked)
        generation = cache.generation + 1
        path = self.home.volume(cache.id, generation)
        meta = {"cache": name, "id": cache.id, "generation": generation,
                "images": [{"name": i.name, "digest": i.digest, "mediaType": i.media_type, "index": i.index,
                            "indexMediaType": i.index_media_type, "platform": i.platform} for i in resolved]}
        if not early:
            self._record(name, lambda c: setattr(c, "volume_state", "packing" if c.volume is None else c.volume_state))
        faults.checkpoint("packing")
        vol = volumes.pack(self.store, blobs, path, capacity, meta, on_progress=self._pack_progress(name, span[1]))
        try:
            self._record(name, lambda c: self._switch_to_volume(c, vol, resolved, generation))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        faults.checkpoint("switched")
        for old in self.home.volumes_of(cache.id):
            if old != path:
                old.unlink(missing_ok=True)  # the previous generation, now replaced

    @staticmethod
    def _check_capacity(unpacked: int, size_gib: int) -> None:
        capacity = size_gib * GIB
        if unpacked > 2 * capacity:
            raise CapacityError(f"the images need more than {2 * size_gib} GiB unpacked, more than twice the "
                                f"cache's imageCacheSize of {size_gib} GiB")
        if unpacked > capacity:
            raise CapacityError(f"the images need {unpacked / GIB:.2f} GiB unpacked, more than the cache's "
                                f"imageCacheSize of {size_gib} GiB; use a size of at least "
                                f"{-(-unpacked // GIB)} GiB")

    def _switch_to_volume(self, c: ImageCache, vol: Volume, resolved: list[ResolvedImage], generation: int) -> None:
        flash_release = c.phase == READY and c.volume_state == "packing"
        c.volume = VolumeInfo(str(vol.path), vol.content_bytes, vol.blob_bytes, vol.capacity, generation)
        c.volume_state = "ready"
        c.generation = generation
        c.images = resolved
        c.pinned = []
        c.message = ""
        c.event("VolumePacked", f"volume {vol.path.name}: {vol.blob_bytes} bytes of blobs in "
                f"{vol.content_bytes} bytes on disk")
        if flash_release:
            c.event("StagingReleased", "serving from the packed volume; the staging copy is released")
        if c.phase != READY:
            c.enter(READY)
            c.event("Ready", "every blob of every image is in the volume and verified")

    def _pack_progress(self, name: str, low: int) -> Callable[[PackProgress], None]:
        saved = [-1]

        def report(p: PackProgress) -> None:
            percent = low + (99 - low) * p.bytes_done // max(p.bytes_total, 1)
            if percent > saved[0]:
                saved[0] = percent
                self._record(name, lambda c: c.set_progress(percent) if c.phase != READY else None)

        return report

    def _fail(self, name: str, reason: str, fatal: bool = False) -> ImageCache:
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

        return self._record(name, failed)

    def _resolved(self, img: PulledImage) -> ResolvedImage:
        index_media_type = index_size = None
        if img.index_digest:
            raw = self.store.read_blob(img.index_digest)
            index_size = len(raw)
            node = self.store.manifest(img.index_digest)
            index_media_type = node.media_type if isinstance(node, Index) else None
        return ResolvedImage(img.name, str(img.descriptor.digest), img.descriptor.media_type, img.descriptor.size,
                             str(img.index_digest) if img.index_digest else None, index_media_type, index_size,
                             str(img.platform) if img.platform else None)

    def _blobs(self, images: list[ResolvedImage]) -> list[Descriptor]:
        """Every blob the volume must hold: indexes, manifests, configs, layers."""
        out: dict[Digest, Descriptor] = {}
        for i in images:
            if i.index:
                d = Digest.parse(i.index)
                out.setdefault(d, Descriptor(i.index_media_type or "", d, i.index_size or 0))
            d = Digest.parse(i.digest)
            out.setdefault(d, Descriptor(i.media_type, d, i.size))
            node = self.store.manifest(d)
            for blob in node.blobs():  # type: ignore[union-attr]
                out.setdefault(blob.digest, blob)
        return list(out.values())

    def _unpacked_size(self, blobs: list[Descriptor], limit: int) -> int:
        """The blobs' unpacked size, or any number above ``limit`` once it is exceeded."""
        total = 0
        for blob in blobs:
            total += self.store.unpacked_size(blob, limit=limit - total)
            if total > limit:
                break
        return total

    def _reuse_sources(self, exclude: str) -> list[VolumeSource]:
        out = []
        for cache in self.db.list():
            if cache.name != exclude and cache.volume and cache.volume_state == "ready":
                try:
                    out.append(VolumeSource(cache.name, Volume.open(Path(cache.volume.path))))
                except ImcError:
                    continue
        return out

    # -- expiry and reclaiming --------------------------------------------------------------

    def gc(self) -> CachesGcReport:
        """Delete expired caches (retention over, failed 24 h ago, automatic and unused
        too long), then reclaim every blob and volume file that nothing needs."""
        report = CachesGcReport()
        now = self.clock()
        unused = dt.timedelta(days=self.settings.auto_unused_days)
        for cache in self.list():
            expire = parse_time(cache.expire)
            last = parse_time(cache.last_used or cache.created)
            if (expire and expire <= now) or (cache.auto and last and last + unused <= now):
                try:
                    self.delete(cache.name)
                    report.deleted.append(cache.name)
                except NotFoundLocalError:
                    pass
        # Blobs pull-through fetched on their own are kept like automatic caches: until unused that long.
        store_report = self.store.gc(pinned=self._pinned, pulled_since=(now - unused).timestamp())
        report.blobs_removed = store_report.blobs_removed
        report.bytes_freed = store_report.bytes_freed
        report.partials_removed = store_report.partials_removed
        report.volumes_removed = self._remove_orphan_volumes()
        return report

    def _pinned(self) -> set[Digest]:
        out: set[Digest] = set()
        for cache in self.db.list():
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
        records = {c.id: c for c in self.db.list()}
        removed = 0

        def wanted(cache_id: str, path: Path | None) -> bool:
            try:
                cache = self.db.by_id(cache_id)
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


def _union(a: list[ResolvedImage], b: list[ResolvedImage]) -> list[ResolvedImage]:
    seen = {i.digest for i in a}
    return a + [i for i in b if i.digest not in seen]
