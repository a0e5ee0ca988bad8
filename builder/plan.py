"""Planning a cache before building it: what the build would fetch, reuse and unpack.

A plan resolves every image the way the build does (the cache's own registry
settings, insecure list and pull secrets; an index narrowed to this home's
platform) and reads each manifest and config, never a layer's bytes. Each blob is
then placed where the build would take it from, asking the same places in the same
order: the store, the volumes the build copies from (``build.volume_sources``), else
the registry. So the plan's bytes to fetch are exactly what the build then fetches,
as long as neither the registry nor the home changes in between.

The unpacked size is exact for what is local (counted once, as the build counts
it) and estimated for the rest from the compression ratio this store's own layers
measured, else ``DEFAULT_RATIO``. The build time is estimated from the transfer rate
this home's recent pulls measured (``builder.throughput``), or unknown.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from builder.build import VolumeSource, cache_puller, volume_sources
from builder.caches import Caches
from builder.digest import Digest, Verifier
from builder.errors import ImcError
from builder.imagecache import GIB, SIZE_MIN, CacheSpec, ImageCache
from builder.oci import Descriptor, layer_compression
from builder.pull import REGISTRY, STORE
from builder.reference import parse as parse_reference
from builder.registry.blobs import CHUNK
from builder.registry.client import Registry
from builder.store import Store
from builder.throughput import TransferLog

DEFAULT_RATIO = 3.0
"""Unpacked bytes per compressed byte when this store has measured none of a
compression: a round-up of the 2.1-2.8 that Debian-, Ubuntu- and Alpine-based gzip
layers unpack to, so an estimate errs towards "needs more room" rather than less."""

MAX_CONFIG_BYTES = 4 << 20
"""A config larger than this is not read by a plan (its size still counts)."""

RATIO_SAMPLE = 4096
"""At most this many of the store's counted layers are sampled for a ratio."""

_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5": "zstd"}


@dataclass(frozen=True)
class Ratio:
    """Unpacked bytes per compressed byte for one compression, and where it comes from."""

    compression: str
    value: float
    layers: int
    """How many of this store's layers it was measured over; 0: ``DEFAULT_RATIO``."""

    @property
    def source(self) -> str:
        return f"measured over {self.layers} layers in this store" if self.layers else "default"


@dataclass(frozen=True)
class BlobPlan:
    """One blob of an image: where the build would take it from (``store``, ``cache:NAME``
    or ``registry``), the other caches whose volumes hold it, and its unpacked size."""

    descriptor: Descriptor
    origin: str
    holders: tuple[str, ...]
    unpacked: int
    estimated: bool


@dataclass
class Totals:
    """Byte counts over a set of blobs (each counted once)."""

    blobs: int = 0
    bytes: int = 0
    to_fetch: int = 0
    in_store: int = 0
    from_caches: int = 0
    """Bytes the build copies from a cache's volume (its own on a rebuild; any with reuse)."""
    in_other_caches: int = 0
    """Bytes not in the store that another cache's volume holds, whether or not the build copies them."""
    caches: list[str] = field(default_factory=list)
    unpacked: int = 0
    unpacked_estimated: int = 0

    def add(self, blob: BlobPlan) -> None:
        size = blob.descriptor.size
        self.blobs += 1
        self.bytes += size
        if blob.origin == REGISTRY:
            self.to_fetch += size
        elif blob.origin == STORE:
            self.in_store += size
        else:
            self.from_caches += size
        if blob.holders:
            self.in_other_caches += size
            self.caches.extend(h for h in blob.holders if h not in self.caches)
        self.unpacked += blob.unpacked
        if blob.estimated:
            self.unpacked_estimated += blob.unpacked

    def to_json(self) -> dict[str, Any]:
        return {"blobs": self.blobs, "bytes": self.bytes, "bytesToFetch": self.to_fetch,
                "bytesInStore": self.in_store, "bytesFromCaches": self.from_caches,
                "bytesInOtherCaches": self.in_other_caches, "otherCaches": sorted(self.caches),
                "unpackedBytes": self.unpacked, "unpackedEstimatedBytes": self.unpacked_estimated}


@dataclass
class ImagePlan:
    """One image as the build would resolve it, and where each of its blobs would come from."""

    image: str
    digest: str
    platform: str | None
    manifest_bytes: int
    """The manifest's (and index's) own bytes: read by the plan, and packed into the volume."""
    blobs: list[BlobPlan]
    index: str | None = None
    index_size: int = 0

    def totals(self) -> Totals:
        out = Totals()
        for blob in self.blobs:
            out.add(blob)
        return out


@dataclass
class Plan:
    """What building ``spec`` would do now. Totals count a blob shared by images once."""

    images: list[ImagePlan]
    size_gib: int
    reuse: bool
    ratios: dict[str, Ratio]
    rate: float | None
    """Bytes per second this home's recent pulls measured; None: unknown."""
    bytes_read: int
    """What the plan itself moved from registries: manifests and configs."""

    def totals(self) -> Totals:
        out = Totals()
        seen: set[Digest] = set()
        for image in self.images:
            for blob in image.blobs:
                if blob.descriptor.digest not in seen:
                    seen.add(blob.descriptor.digest)
                    out.add(blob)
        return out

    @property
    def manifest_bytes(self) -> int:
        """Manifests and indexes, each counted once (two tags may name the same one)."""
        manifests = {i.digest: i.manifest_bytes - i.index_size for i in self.images}
        indexes = {i.index: i.index_size for i in self.images if i.index}
        return sum(manifests.values()) + sum(indexes.values())

    def estimated_with(self) -> list[Ratio]:
        """The ratios the estimate used: those of the compressions of its estimated layers."""
        kinds = {layer_compression(b.descriptor.media_type) for i in self.images for b in i.blobs if b.estimated}
        return [r for k, r in sorted(self.ratios.items()) if k in kinds]

    @property
    def unpacked(self) -> int:
        """The size the build checks against the cache: every blob unpacked, manifests as they are."""
        return self.totals().unpacked + self.manifest_bytes

    @property
    def capacity(self) -> int:
        return self.size_gib * GIB

    @property
    def fits(self) -> bool:
        return self.unpacked <= self.capacity

    @property
    def size_needed_gib(self) -> int:
        """The smallest valid size the images fit."""
        return max(SIZE_MIN, -(-self.unpacked // GIB))

    @property
    def seconds(self) -> float | None:
        """Estimated transfer time of the bytes to fetch; None when the rate is unknown."""
        to_fetch = self.totals().to_fetch
        if to_fetch == 0:
            return 0.0
        return to_fetch / self.rate if self.rate else None

    def verdict(self) -> str:
        """One line: it fits, or how much it needs."""
        how = "estimated" if self.totals().unpacked_estimated else "exact"
        if self.fits:
            shown = f"{self.unpacked / GIB:.2f} GiB" if self.unpacked >= GIB // 100 else f"{self.unpacked / 1e6:.1f} MB"
            return f"fits: {shown} unpacked ({how}) of {self.size_gib} GiB"
        return (f"does not fit: the images need {self.unpacked / GIB:.2f} GiB unpacked ({how}), more than the "
                f"cache's imageCacheSize of {self.size_gib} GiB; use a size of at least {self.size_needed_gib} GiB")

    def to_json(self) -> dict[str, Any]:
        """The plan as the API's ``status.plan`` and ``-o json`` show it."""
        totals = self.totals()
        return {
            "images": [{"image": i.image, "digest": i.digest, "platform": i.platform, **i.totals().to_json()}
                       for i in self.images],
            "total": {**totals.to_json(), "manifestBytes": self.manifest_bytes},
            "reuse": self.reuse,
            "unpackedBytes": self.unpacked,
            "unpackedEstimated": totals.unpacked_estimated > 0,
            "ratios": {k: {"ratio": round(r.value, 3), "source": r.source} for k, r in sorted(self.ratios.items())},
            "capacityBytes": self.capacity,
            "fits": self.fits,
            "sizeNeededGiB": self.size_needed_gib,
            "transferRate": round(self.rate) if self.rate else None,
            "estimatedSeconds": None if self.seconds is None else round(self.seconds, 1),
            "planBytesRead": self.bytes_read,
        }


def plan(caches: Caches, spec: CacheSpec, own: ImageCache | None = None, timeout: float | None = None,
         secrets: dict[str, Any] | None = None) -> Plan:
    """Plan building ``spec`` (validated first) in this home: ``own`` is the cache's
    current record when it exists (its volume is then a source, as in a rebuild).
    ``secrets`` are pull secrets not stored yet (a file that brings them along),
    by ``namespace:name``. Writes nothing; raises what resolving the images raises."""
    spec = spec.validated()
    sources = volume_sources(caches, own, spec.reuse)
    others = [s for s in volume_sources(caches, None, True) if own is None or s.name != f"cache:{own.name}"]
    puller = cache_puller(caches, spec, caches.settings.retry_policy(timeout), sources=sources, secrets=secrets)
    store = caches.store
    limit = 2 * spec.size_gib * GIB  # as the build counts: enough to say how much is needed
    ratios = measured_ratios(store)
    images: list[ImagePlan] = []
    read = 0
    counted = 0
    sizes: dict[Digest, tuple[int, bool]] = {}  # a blob shared by images is counted once
    for text in spec.images:
        ref = parse_reference(text)
        resolved = puller.resolve(ref, keep_index=False)
        manifest = resolved.manifest
        manifest_bytes = len(manifest.raw) + resolved.index_size
        read += manifest_bytes
        read += _read_config(store, resolved.registry, ref.repository, manifest.config)
        blobs = []
        for desc in manifest.blobs():
            origin = _origin(store, sources, desc.digest)
            holders = tuple(s.name.removeprefix("cache:") for s in others
                            if origin != STORE and s.volume.has(desc.digest))
            if desc.digest not in sizes:
                sizes[desc.digest] = _unpacked(store, desc, ratios, max(limit - counted, 0))
                counted += sizes[desc.digest][0]
            unpacked, estimated = sizes[desc.digest]
            blobs.append(BlobPlan(desc, origin, holders, unpacked, estimated))
        images.append(ImagePlan(str(ref), str(resolved.descriptor.digest),
                                str(resolved.platform) if resolved.platform else None, manifest_bytes, blobs,
                                str(resolved.index_digest) if resolved.index_digest else None, resolved.index_size))
    return Plan(images, spec.size_gib, spec.reuse, ratios, TransferLog(caches.home).rate(), read)


def _origin(store: Store, sources: list[VolumeSource], digest: Digest) -> str:
    """Where the build's pull takes a blob from: the store first, then each source in turn."""
    if store.has(digest):
        return STORE
    for source in sources:
        if source.volume.has(digest):
            return source.name
    return REGISTRY


def _read_config(store: Store, registry: Registry, repository: str, config: Descriptor) -> int:
    """Read and verify an image's config unless the store holds it; the bytes read.
    It is not kept: a plan writes nothing, and the build fetches it like any blob."""
    if store.has(config.digest) or config.size > MAX_CONFIG_BYTES:
        return 0
    sink = _MemorySink(config.digest, config.size)
    registry.fetch_blob(repository, config.digest, config.size, sink)
    sink.verifier.verify()
    return config.size


class _MemorySink:
    """A blob sink that only hashes: a config read to check it, not to keep."""

    def __init__(self, digest: Digest, size: int) -> None:
        self.verifier = Verifier(digest, size, f"config {digest}")

    @property
    def offset(self) -> int:
        return self.verifier.count

    def receive(self, read: Callable[[memoryview], int]) -> int:
        buf = memoryview(bytearray(CHUNK))
        n = read(buf)
        self.verifier.update(buf[:n])
        return n

    def reset(self) -> None:
        self.verifier.reset()


def _unpacked(store: Store, desc: Descriptor, ratios: dict[str, Ratio], limit: int) -> tuple[int, bool]:
    """A blob's unpacked size, and whether it is an estimate: exact when the store holds
    it (counted now if never before) or has counted it before; else its size times the
    ratio of its compression."""
    kind = layer_compression(desc.media_type)
    if kind not in ("gzip", "zstd"):
        return desc.size, False
    if store.has(desc.digest):
        return store.unpacked_size(desc, limit=limit), False
    with contextlib.suppress(OSError, ValueError):
        return int(store.home.unpacked_record(desc.digest).read_bytes()), False
    return round(desc.size * ratios[kind].value), True


def measured_ratios(store: Store) -> dict[str, Ratio]:
    """The unpacked-to-compressed ratio of each compression over the store's layers
    whose unpacked size has been counted, told apart by their first bytes."""
    sums = {"gzip": [0, 0, 0], "zstd": [0, 0, 0]}  # unpacked, compressed, layers
    for digest, unpacked in _counted(store):
        path = store.home.blob(digest)
        try:
            with open(path, "rb") as f:
                kind = _MAGIC.get(f.read(2))
            size = path.stat().st_size
        except OSError:
            continue
        if kind is not None and size > 0:
            sums[kind][0] += unpacked
            sums[kind][1] += size
            sums[kind][2] += 1
    return {kind: Ratio(kind, u / c, n) if n else Ratio(kind, DEFAULT_RATIO, 0)
            for kind, (u, c, n) in sums.items()}


def _counted(store: Store) -> Iterator[tuple[Digest, int]]:
    """(digest, unpacked size) of the layers the store has counted, at most ``RATIO_SAMPLE``."""
    folder = store.home.unpacked
    try:
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))[:RATIO_SAMPLE]
    except OSError:
        return
    for name in names:
        algorithm, _, hexpart = name.partition("-")
        try:
            digest = Digest.parse(f"{algorithm}:{hexpart}")
            yield digest, int((folder / name).read_bytes())
        except (ImcError, OSError, ValueError):
            continue
