"""Building a cache: the pipeline from a record in Creating or Updating to Ready.

    Creating ─ pull every image into the store (pinned by the record, so gc keeps it)
             ─ check the unpacked size against the cache's size
             ─ [flash: Ready now, served from the store's staging copy]
             ─ pack the volume ─ Ready, served from the volume, store pin released

``Caches`` owns the records and their lifecycle (create, update, delete, expiry); the
``Builder`` does the work between, and touches the records only through ``Caches``.
Whoever builds holds the cache's ``BuildLease`` until the build ends, so a builder
that dies is noticed by the next reader (``Caches`` marks it Failed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from builder import faults
from builder import volume as volumes
from builder.caches import BuildLease, Caches
from builder.digest import Digest
from builder.errors import CacheDeletedError, CacheStateError, CapacityError, ImcError, NotFoundLocalError
from builder.imagecache import (
    BUILDING,
    CREATING,
    GIB,
    READY,
    CacheSpec,
    Event,
    ImageCache,
    ResolvedImage,
    VolumeInfo,
)
from builder.oci import Descriptor, Index
from builder.pull import (
    BlobDone,
    BlobProgress,
    BlobSource,
    ImageResolved,
    PulledImage,
    Puller,
    PullEvent,
    PullPlanned,
)
from builder.reference import parse as parse_reference
from builder.registry.auth import DockerConfig, Keychain
from builder.registry.hosts import HostPolicy
from builder.registry.retry import RetryPolicy
from builder.volume import PackProgress, Volume


class VolumeSource:
    """Another cache's volume as a place to copy blobs from (the reuse option)."""

    def __init__(self, cache: str, vol: Volume) -> None:
        self.name = f"cache:{cache}"
        self.volume = vol

    def open_blob(self, digest: Digest) -> BinaryIO | None:
        return self.volume.open_blob(digest) if self.volume.has(digest) else None


class Builder:
    """Builds the caches of one home, each under the lease its creator took."""

    def __init__(self, caches: Caches) -> None:
        self.caches = caches

    def build(self, name: str, lease: BuildLease, on_pull: Callable[[PullEvent], None] | None = None,
              on_event: Callable[[Event], None] | None = None, timeout: float | None = None) -> ImageCache:
        """Run the build of a cache in Creating or Updating, then release the lease.

        Never raises for a build failure: the failure is the cache's new phase, with an
        event saying why. ``on_event`` sees each cache event as it is recorded. The pull
        gives up after ``timeout`` seconds (default: the ``pull_timeout_seconds`` setting).
        Returns the final record; raises ``CacheDeletedError`` if the cache was
        deleted while it was being built (there is nothing left to report to).
        """
        job = _Build(self.caches, name, on_pull, on_event, self.caches.settings.retry_policy(timeout))
        try:
            job.run()
        except CacheDeletedError:
            raise
        except (ImcError, OSError) as e:
            job.fail(getattr(e, "message", None) or f"{type(e).__name__}: {e}", fatal=isinstance(e, CapacityError))
        except BaseException:
            job.fail("the build was interrupted")
            raise
        finally:
            lease.release()
        try:
            final = self.caches.get(name)
        except NotFoundLocalError:
            raise job.deleted() from None
        return self._keep_budget(final) if final.auto and final.phase == READY else final

    def _keep_budget(self, built: ImageCache) -> ImageCache:
        """A new automatic cache may take the automatic caches past ``auto_max_bytes``:
        the least recently used others go now, and the new cache's events say which."""
        retired = self.caches.enforce_budget()
        if not retired:
            return built

        def record(c: ImageCache) -> None:
            for r in retired:
                c.event("BudgetEnforced", f"automatic image cache {r.name} ({r.id}) deleted: {r.reason}")

        try:
            return self.caches.change(built.name, record)
        except NotFoundLocalError:
            return built  # deleted meanwhile: the log has said what went


class _BuildProgress:
    """Turns pull events into cache progress and events.

    Events are written as they happen; progress alone at most every ``SAVE_EVERY``
    seconds, since each write is a database transaction taken on a download thread.
    """

    SAVE_EVERY = 0.5

    def __init__(self, job: _Build, span: tuple[int, int]) -> None:
        self.job = job
        self.low, self.high = span
        self.forward = job.on_pull
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

            self.job.record(apply)


class _Build:
    """One build of one cache: its steps, each recorded on the cache as it ends."""

    def __init__(self, caches: Caches, name: str, on_pull: Callable[[PullEvent], None] | None,
                 on_event: Callable[[Event], None] | None, retry: RetryPolicy) -> None:
        self.caches = caches
        self.retry = retry
        self.store = caches.store
        self.name = name
        self.on_pull = on_pull
        self.on_event = on_event

    def deleted(self) -> CacheDeletedError:
        return CacheDeletedError(f"image cache {self.name} was deleted while it was being built")

    def record(self, change: Callable[[ImageCache], None]) -> ImageCache:
        """Change this cache's record. Only a record that is gone becomes
        ``CacheDeletedError``; a NotFoundLocalError of the build's own (a store blob
        missing) is a failure of the build like any other."""
        ran = False

        def tracked(cache: ImageCache) -> None:
            nonlocal ran
            ran = True
            change(cache)

        try:
            return self.caches.change(self.name, tracked, self.on_event)
        except NotFoundLocalError:
            if ran:
                raise
            raise self.deleted() from None

    def fail(self, reason: str, fatal: bool = False) -> None:
        try:
            self.caches.fail(self.name, reason, fatal, self.on_event)
        except NotFoundLocalError:
            raise self.deleted() from None

    def run(self) -> None:
        try:
            cache = self.caches.get(self.name)
        except NotFoundLocalError:
            raise self.deleted() from None
        if cache.phase not in BUILDING:
            raise CacheStateError(f"image cache {self.name} is {cache.phase}: nothing to build")
        spec = cache.spec
        sources = volume_sources(self.caches, cache, spec.reuse)
        # Flash makes a new cache usable from staging; an update keeps serving the old
        # volume until the new one is packed, so it has nothing to gain from it.
        early = spec.flash and cache.phase == CREATING
        span = (5, 90) if early else (5, 80)
        puller = cache_puller(self.caches, spec, self.retry, _BuildProgress(self, span), sources)
        self.record(lambda c: c.event("Pulling", f"pulling {len(spec.images)} images"))
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

            self.record(staged)
        faults.checkpoint("pulled")
        capacity = spec.size_gib * GIB
        blobs = self._blobs(resolved)
        if early:
            # Usable now if the layers' own size headers fit; the exact count follows.
            declared = sum(self.store.declared_unpacked_size(b) for b in blobs)
            check_capacity(declared, spec.size_gib)

            def flash_ready(c: ImageCache) -> None:
                c.images = resolved
                c.enter(READY)
                c.volume_state = "packing"
                c.event("FlashReady", "usable now from local staging; packing the volume in the background")

            self.record(flash_ready)
            faults.checkpoint("flash-ready")
        # Count up to twice the size: enough to say how much is needed, while a
        # decompression bomb costs at most that much work.
        unpacked = self._unpacked_size(blobs, 2 * capacity)
        check_capacity(unpacked, spec.size_gib)

        def checked(c: ImageCache) -> None:
            c.unpacked_bytes = unpacked
            c.set_progress(span[1])
            c.event("CapacityChecked", f"{unpacked} bytes unpacked fit {spec.size_gib} GiB")

        cache = self.record(checked)
        generation = cache.generation + 1
        path = self.caches.home.volume(cache.id, generation)
        meta = {"cache": self.name, "id": cache.id, "generation": generation,
                "images": [{"name": i.name, "digest": i.digest, "mediaType": i.media_type, "index": i.index,
                            "indexMediaType": i.index_media_type, "platform": i.platform} for i in resolved]}
        if not early:
            self.record(lambda c: setattr(c, "volume_state", "packing" if c.volume is None else c.volume_state))
        faults.checkpoint("packing")
        vol = volumes.pack(self.store, blobs, path, capacity, meta, on_progress=self._pack_progress(span[1]))
        try:
            self.record(lambda c: switch_to_volume(c, vol, resolved, generation))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        faults.checkpoint("switched")
        for old in self.caches.home.volumes_of(cache.id):
            if old != path:
                old.unlink(missing_ok=True)  # the previous generation, now replaced

    def _pack_progress(self, low: int) -> Callable[[PackProgress], None]:
        saved = [-1]

        def report(p: PackProgress) -> None:
            percent = low + (99 - low) * p.bytes_done // max(p.bytes_total, 1)
            if percent > saved[0]:
                saved[0] = percent
                self.record(lambda c: c.set_progress(percent) if c.phase != READY else None)

        return report

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



def volume_sources(caches: Caches, own: ImageCache | None, reuse: bool) -> list[VolumeSource]:
    """Where a build copies blobs from before the network, in the order it tries them:
    the cache's own volume when it is rebuilt (a new size re-packs what it holds), and
    with ``reuse`` every cache's volume. A plan asks the same (``builder.plan``)."""
    out = []
    for other in caches.list() if reuse else [own] if own is not None else []:
        if other.volume and other.volume_state == "ready":
            try:
                out.append(VolumeSource(other.name, Volume.open(Path(other.volume.path))))
            except ImcError:
                continue
    return out


def cache_puller(caches: Caches, spec: CacheSpec, retry: RetryPolicy,
                 on_event: Callable[[PullEvent], None] | None = None, sources: Sequence[BlobSource] = (),
                 secrets: dict[str, DockerConfig] | None = None) -> Puller:
    """The puller a cache's images are resolved and fetched with: its own plain-HTTP and
    insecure lists and pull secrets (then the user's credential files), and the home's
    platform. A drift check and a plan ask the registries with this one too, so they
    see what a build would. ``secrets``: pull secrets not stored yet (a file that
    brings them along), used before the stored ones of the same name."""
    given = secrets or {}
    keychain = Keychain([given[s] if s in given else caches.secrets.load(s) for s in spec.image_pull_secrets])
    policy = HostPolicy(frozenset(spec.plain_http), frozenset(spec.insecure))
    return Puller(caches.store, policy, keychain, caches.platform, caches.concurrency, on_event=on_event,
                  retry=retry, sources=sources)


def check_capacity(unpacked: int, size_gib: int) -> None:
    """Refuse content whose unpacked size does not fit ``size_gib``, saying the size it needs."""
    capacity = size_gib * GIB
    if unpacked > 2 * capacity:
        raise CapacityError(f"the images need more than {2 * size_gib} GiB unpacked, more than twice the "
                            f"cache's imageCacheSize of {size_gib} GiB")
    if unpacked > capacity:
        raise CapacityError(f"the images need {unpacked / GIB:.2f} GiB unpacked, more than the cache's "
                            f"imageCacheSize of {size_gib} GiB; use a size of at least "
                            f"{-(-unpacked // GIB)} GiB")


def switch_to_volume(c: ImageCache, vol: Volume, resolved: list[ResolvedImage], generation: int) -> None:
    """The record change that makes a packed volume the cache's content."""
    flash_release = c.phase == READY and c.volume_state == "packing"
    c.volume = VolumeInfo(str(vol.path), vol.content_bytes, vol.blob_bytes, vol.capacity, generation)
    c.volume_state = "ready"
    c.generation = generation
    c.images = resolved
    c.resolved_again()
    c.pinned = []
    c.message = ""
    c.event("VolumePacked", f"volume {vol.path.name}: {vol.blob_bytes} bytes of blobs in "
            f"{vol.content_bytes} bytes on disk")
    if flash_release:
        c.event("StagingReleased", "serving from the packed volume; the staging copy is released")
    if c.phase != READY:
        c.enter(READY)
        c.event("Ready", "every blob of every image is in the volume and verified")


def _union(a: list[ResolvedImage], b: list[ResolvedImage]) -> list[ResolvedImage]:
    seen = {i.digest for i in a}
    return a + [i for i in b if i.digest not in seen]
