"""Image caches as OCI artifacts: push a Ready cache to a registry, pull it on another node.

A fleet builds a cache once, pushes it, and every node pulls the artifact and serves it
with ``imc serve`` without touching the images' own registries. The artifact is an
OCI image manifest (``application/vnd.oci.image.manifest.v1+json``)::

    artifactType  application/vnd.imc.snapshot.v1
    config        application/vnd.imc.snapshot.config.v1+json
                    the ImageCache object (``ImageCache.to_object()``) with its status
                    reduced to what a receiver needs: phase, id, images with their
                    digests, unpacked and volume sizes (no events, no local paths)
    layers        application/vnd.imc.snapshot.volume.v1, one per part of the volume
                    file, in order; part i holds bytes [offset, offset + size) of the
                    volume, ``dev.imc.volume.offset`` says which, and its
                    ``org.opencontainers.image.title`` is ``NAME.imcv.part-NNNN``
                    (as many digits as the last part needs), so that a generic
                    client (oras pull) writes each part to its own file and
                    ``cat NAME.imcv.part-* > NAME.imcv`` puts them back in order
    annotations   dev.imc.volume.size (the whole file), dev.imc.cache.name,
                  dev.imc.cache.id, org.opencontainers.image.created

Annotation keys are in reverse-domain form, as the image spec asks; artifacts pushed
before that used ``vnd.imc.*`` keys, which are still read.

Why parts, not one layer: registry:2 (distribution 2.8, measured) cancels an upload
session whose PATCH was cut mid-body, because the session's offset travels signed in
the upload URL and no longer matches the bytes it holds; so a single-layer volume
would go up again from byte 0 after any dropped connection. With parts, a part that
is already in the registry is skipped (HEAD), at most one part is sent again, a new
``imc volume push`` after a crash picks up where the last one stopped, and a pull
fetches parts in parallel, each resumed with Range. Within a part the upload is
chunked (PATCH with Content-Range) and resumes from the offset the registry reports
wherever the registry keeps the session. 64 MiB parts keep the manifest small (a
32 GiB volume is 512 layers) while bounding what one failure costs.

Pulling verifies the manifest and every part by digest, then the volume itself
(``Volume.open`` and ``verify``), and only then registers a Ready cache; anything
that fails leaves no record and no file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.caches import Caches, ImportedVolume
from builder.digest import Digest, Verifier, verify_bytes
from builder.errors import (
    AlreadyExistsError,
    CacheStateError,
    DigestMismatchError,
    ImcError,
    StoreError,
    UnsupportedError,
    ValidationError,
)
from builder.home import VOLUME_SUFFIX, open_unlinked
from builder.imagecache import (
    API_VERSION,
    KIND,
    READY,
    ImageCache,
    ResolvedImage,
    now_utc,
    rfc3339,
    spec_from_object,
    validate_name,
)
from builder.oci import OCI_MANIFEST, Descriptor, detect_media_type
from builder.reference import Reference
from builder.reference import parse as parse_reference
from builder.registry.auth import Keychain
from builder.registry.blobs import CHUNK, BlobSink
from builder.registry.client import Registry
from builder.registry.hosts import HostPolicy
from builder.registry.retry import RetryPolicy
from builder.registry.uploads import UPLOAD_CHUNK
from builder.store import pread_exact
from builder.volume import Volume

ARTIFACT_TYPE = "application/vnd.imc.snapshot.v1"
CONFIG_TYPE = "application/vnd.imc.snapshot.config.v1+json"
VOLUME_TYPE = "application/vnd.imc.snapshot.volume.v1"
A_VOLUME_SIZE = "dev.imc.volume.size"
A_OFFSET = "dev.imc.volume.offset"
A_CACHE_NAME = "dev.imc.cache.name"
A_CACHE_ID = "dev.imc.cache.id"
A_TITLE = "org.opencontainers.image.title"
A_CREATED = "org.opencontainers.image.created"

PART_SIZE = 64 << 20
PART_INFIX = ".part-"
MAX_CONFIG_BYTES = 1 << 20
_READ = 4 << 20
_ID_RE = re.compile(r"^imc-[a-z0-9]{1,40}\Z")


@dataclass(frozen=True)
class PartSkipped:
    """Part ``part`` of ``parts`` (``size`` bytes) is already in the registry: not sent."""

    part: int
    parts: int
    size: int


@dataclass(frozen=True)
class PartDone:
    """Part ``part`` of ``parts`` (``size`` bytes) is moved and verified."""

    part: int
    parts: int
    size: int


@dataclass(frozen=True)
class TransferPlanned:
    """The parts to move, with each one's size, before the first byte moves."""

    sizes: tuple[int, ...]

    @property
    def parts(self) -> int:
        return len(self.sizes)

    @property
    def size(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class BytesMoved:
    """``delta`` more bytes of part ``part`` moved; negative when an upload session
    was abandoned."""

    delta: int
    part: int | None = None


@dataclass(frozen=True)
class Verifying:
    """The pulled volume (``size`` bytes) is being rehashed before it is registered."""

    size: int


TransferEvent = TransferPlanned | PartSkipped | PartDone | BytesMoved | Verifying
"""Progress of a push or pull, for the CLI to render: one type per kind of step."""


@dataclass(frozen=True)
class PushResult:
    """What ``push_cache`` published."""

    reference: str
    digest: str
    config_digest: str
    volume_bytes: int
    parts: int
    parts_uploaded: int
    parts_skipped: int
    bytes_sent: int

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "digest": self.digest, "config": self.config_digest,
                "volumeBytes": self.volume_bytes, "parts": self.parts, "partsUploaded": self.parts_uploaded,
                "partsSkipped": self.parts_skipped, "bytesSent": self.bytes_sent}


@dataclass(frozen=True)
class Artifact:
    """A parsed imc snapshot artifact: its config and the volume's parts with offsets."""

    digest: Digest
    config: Descriptor
    parts: tuple[tuple[Descriptor, int], ...]
    volume_size: int


Progress = Callable[[TransferEvent], None]


def _registry(ref: Reference, policy: HostPolicy | None, keychain: Keychain | None, retry: RetryPolicy | None,
              push: bool) -> Registry:
    return Registry(ref.api_host, policy, keychain, retry=retry, push=push)


# -- pushing ---------------------------------------------------------------------------


def artifact_config(cache: ImageCache, volume: Volume) -> dict[str, Any]:
    """The ImageCache object as the artifact carries it: spec and identity as they are,
    the status cut down to what a receiver needs (no events, times or local paths)."""
    obj = cache.to_object()
    status = obj["status"]
    obj["status"] = {
        "phase": READY,
        "imageCacheId": cache.id,
        "images": status["images"],
        "unpackedBytes": cache.unpacked_bytes,
        "volume": {"contentBytes": volume.content_bytes, "blobBytes": volume.blob_bytes,
                   "capacityBytes": volume.capacity},
    }
    return obj


def _plan_parts(size: int, part_size: int) -> list[tuple[int, int]]:
    return [(offset, min(part_size, size - offset)) for offset in range(0, size, part_size)] or [(0, 0)]


def _hash_range(fd: int, offset: int, size: int) -> Digest:
    h = hashlib.sha256()
    pos = offset
    while pos < offset + size:
        data = pread_exact(fd, pos, min(_READ, offset + size - pos), "the volume being pushed")
        h.update(data)
        pos += len(data)
    return Digest("sha256", h.hexdigest())


def push_cache(caches: Caches, name: str, target: Reference, policy: HostPolicy | None = None,
               keychain: Keychain | None = None, *, part_size: int = PART_SIZE, chunk_size: int = UPLOAD_CHUNK,
               retry: RetryPolicy | None = None, on_progress: Progress | None = None) -> PushResult:
    """Publish a Ready cache's volume and record (``name``: its name or id) as an
    artifact at ``target`` (a tag).

    The volume is verified first (a corrupt cache is never published), then cut into
    parts; parts the registry already holds are skipped, the others are uploaded in
    chunks with resume, and the manifest goes last, so the tag never names an
    artifact whose blobs are not all there.
    """
    if target.digest is not None:
        raise ValidationError(f"{target}: push to a tag, not a digest (the digest is known only after the push)")
    if part_size < 1 or chunk_size < 1:
        raise ValidationError("part and chunk sizes must be positive")
    emit = on_progress or (lambda event: None)
    cache = caches.find(name)
    name = cache.name
    if cache.phase != READY or cache.volume is None or cache.volume_state != "ready":
        raise CacheStateError(f"image cache {name} is {cache.phase} (volume {cache.volume_state}): only a Ready "
                              "cache with a packed volume can be pushed")
    path = Path(cache.volume.path)
    try:
        # Held for the whole push: a rebuild that replaces the file cannot change what we send.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StoreError(f"volume {path} cannot be read: {e.strerror}") from None
    try:
        volume = Volume.open(path)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise CacheStateError(f"the volume of {name} was replaced while the push started; push again")
        report = volume.verify()
        if not report.ok:
            raise DigestMismatchError(f"volume of {name} is corrupt ({len(report.corrupt)} blobs do not verify); "
                                      "rebuild the cache before pushing it")
        size = os.fstat(fd).st_size
        config = json.dumps(artifact_config(cache, volume), indent=1, sort_keys=False).encode()
        config_desc = Descriptor(CONFIG_TYPE, Digest.of(config), len(config))
        parts = [(offset, n, _hash_range(fd, offset, n)) for offset, n in _plan_parts(size, part_size)]
        registry = _registry(target, policy, keychain, retry, push=True)
        repo = target.repository
        if not registry.blob_exists(repo, config_desc.digest):
            registry.upload_blob(repo, config_desc.digest, config)
        uploaded = skipped = sent = 0
        layers = []
        emit(TransferPlanned(tuple(n for _, n, _ in parts)))
        width = max(4, len(str(len(parts) - 1)))  # one width for all: a shell glob sorts them in order
        for i, (offset, n, digest) in enumerate(parts):
            layers.append(Descriptor(VOLUME_TYPE, digest, n, annotations={
                A_TITLE: f"{cache.name}{VOLUME_SUFFIX}{PART_INFIX}{i:0{width}d}", A_OFFSET: str(offset)}))
            if registry.blob_exists(repo, digest):
                skipped += 1
                emit(PartSkipped(i, len(parts), n))
                continue

            def read(pos: int, count: int, base: int = offset) -> bytes:
                return pread_exact(fd, base + pos, count, "the volume being pushed")

            def moved(count: int, part: int = i) -> None:
                emit(BytesMoved(count, part))

            if n <= chunk_size:
                registry.upload_blob(repo, digest, read(0, n))
                sent += n
                moved(n)
            else:
                sent += registry.upload_blob_chunked(repo, digest, n, read, chunk_size, on_bytes=moved)
            uploaded += 1
            emit(PartDone(i, len(parts), n))
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": config_desc.to_json(),
            "layers": [d.to_json() for d in layers],
            "annotations": {A_VOLUME_SIZE: str(size), A_CACHE_NAME: cache.name, A_CACHE_ID: cache.id,
                            A_CREATED: rfc3339(now_utc()) or ""},
        }
        raw = json.dumps(manifest, indent=1).encode()
        digest = registry.put_manifest(repo, target.tag or "latest", raw, OCI_MANIFEST)
    finally:
        os.close(fd)
    return PushResult(str(target), str(digest), str(config_desc.digest), size, len(parts), uploaded, skipped, sent)


# -- pulling ---------------------------------------------------------------------------


def _annotation(annotations: dict[str, str], key: str) -> str | None:
    """An annotation by its ``dev.imc.`` key, or by the ``vnd.imc.`` key artifacts
    pushed before the reverse-domain keys used."""
    value = annotations.get(key)
    return value if value is not None else annotations.get("vnd.imc." + key.removeprefix("dev.imc."))


def parse_artifact(raw: bytes, header_type: str | None, what: str) -> Artifact:
    """Read an imc snapshot artifact's manifest; ``UnsupportedError`` for anything
    else (an ordinary image, an index, another kind of artifact) or a malformed one."""
    media_type = detect_media_type(raw, header_type)
    obj = json.loads(raw)
    config_obj = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    config_type = config_obj.get("mediaType") if isinstance(config_obj, dict) else None
    artifact_type = obj.get("artifactType")
    if media_type != OCI_MANIFEST or config_type != CONFIG_TYPE or artifact_type not in (None, ARTIFACT_TYPE):
        kind = artifact_type or config_type or media_type or "unknown content"
        raise UnsupportedError(f"{what} is not an imc snapshot artifact (it is {kind}; want artifactType "
                               f"{ARTIFACT_TYPE}): push one with 'imc volume push'")
    layers = obj.get("layers")
    try:
        config = Descriptor.from_json(config_obj)
        if not isinstance(layers, list) or not layers:
            raise ValidationError("no volume layers")
        parts = []
        offset = 0
        for layer in layers:
            desc = Descriptor.from_json(layer)
            if desc.media_type != VOLUME_TYPE:
                raise ValidationError(f"layer {desc.digest} has media type {desc.media_type!r}, not {VOLUME_TYPE}")
            declared = _annotation(desc.annotations, A_OFFSET)
            if declared is not None and declared != str(offset):
                raise ValidationError(f"layer {desc.digest} says it starts at {declared}, not {offset}")
            parts.append((desc, offset))
            offset += desc.size
        annotations = obj.get("annotations") if isinstance(obj.get("annotations"), dict) else {}
        declared_size = _annotation(annotations, A_VOLUME_SIZE)
        if declared_size is not None and declared_size != str(offset):
            raise ValidationError(f"the parts add up to {offset} bytes, the manifest says {declared_size}")
    except ValidationError as e:
        raise UnsupportedError(f"{what}: malformed imc snapshot artifact: {e.message}") from None
    if config.size > MAX_CONFIG_BYTES:
        raise UnsupportedError(f"{what}: config of {config.size} bytes exceeds the {MAX_CONFIG_BYTES}-byte cap")
    return Artifact(Digest.of(raw), config, tuple(parts), offset)


class _MemorySink:
    """A small blob (the config) into memory, hashed as it arrives."""

    def __init__(self) -> None:
        self.data = bytearray()

    @property
    def offset(self) -> int:
        return len(self.data)

    def receive(self, read: Callable[[memoryview], int]) -> int:
        buf = memoryview(bytearray(CHUNK))
        n = read(buf)
        self.data += buf[:n]
        return n

    def reset(self) -> None:
        self.data.clear()


class _PartSink:
    """One part of the volume, written at its place in the partial file and hashed."""

    def __init__(self, fd: int, base: int, desc: Descriptor) -> None:
        self.fd, self.base, self.desc = fd, base, desc
        self._buf: memoryview | None = None
        self._verifier = Verifier(desc.digest, desc.size, f"part {desc.digest}")

    @property
    def offset(self) -> int:
        return self._verifier.count

    def receive(self, read: Callable[[memoryview], int]) -> int:
        if self._buf is None:
            self._buf = memoryview(bytearray(CHUNK))
        n = read(self._buf)
        self.write(self._buf[:n])
        return n

    def write(self, data: memoryview | bytes) -> None:
        pos = self.base + self._verifier.count
        self._verifier.update(data)  # first: a part longer than declared is refused before it is written
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def reset(self) -> None:
        self._verifier.reset()

    def check(self) -> None:
        self._verifier.verify()


def _fetch(registry: Registry, repository: str, desc: Descriptor, sink: BlobSink,
           on_bytes: Callable[[int], None] | None = None) -> None:
    registry.fetch_blob(repository, desc.digest, desc.size, sink, on_bytes)


def _read_config(registry: Registry, source: Reference, artifact: Artifact) -> dict[str, Any]:
    sink = _MemorySink()
    _fetch(registry, source.repository, artifact.config, sink)
    data = bytes(sink.data)
    verify_bytes(data, artifact.config.digest, f"{source}: config {artifact.config.digest}")
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
        raise UnsupportedError(f"{source}: the artifact's config is not an ImageCache object")
    return obj


def _resolved_images(volume: Volume, what: str) -> list[ResolvedImage]:
    """The images a volume serves, from its meta, each checked to be in the volume and
    to parse (the server indexes them by reference)."""
    images = volume.meta.get("images")
    if not isinstance(images, list) or not images:
        raise UnsupportedError(f"{what}: the volume names no images")
    out = []
    try:
        for image in images:
            name = str(parse_reference(str(image["name"])))
            digest = Digest.parse(str(image["digest"]))
            index = Digest.parse(str(image["index"])) if image.get("index") else None
            if not volume.has(digest) or (index and not volume.has(index)):
                raise ValidationError(f"image {name} is not in the volume")
            out.append(ResolvedImage(
                name, str(digest), str(image.get("mediaType") or volume.entry(digest).media_type),
                volume.entry(digest).size, str(index) if index else None,
                str(image["indexMediaType"]) if index and image.get("indexMediaType") else None,
                volume.entry(index).size if index else None,
                str(image["platform"]) if image.get("platform") else None))
    except (KeyError, TypeError, ImcError) as e:
        raise UnsupportedError(f"{what}: the volume's image list is malformed: {getattr(e, 'message', e)}") from None
    return out


def _wanted_id(config: dict[str, Any]) -> str | None:
    """The source cache's id, kept when this home does not use it yet, so a pod that
    names the cache by id (``eci-image-snapshot-id``) finds it on every node."""
    status = config.get("status") if isinstance(config.get("status"), dict) else {}
    wanted = status.get("imageCacheId") or (config.get("metadata") or {}).get("uid")
    return wanted if isinstance(wanted, str) and _ID_RE.match(wanted) else None


def _reserve(fd: int, size: int, where: Path) -> None:
    """Claim the volume's space up front: a full disk fails now, with a clear error."""
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StoreError(f"no space left in {where} for a volume of {size} bytes") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise StoreError(f"cannot write in {where}: {e.strerror}") from None
        os.ftruncate(fd, size)


def pull_cache(caches: Caches, source: Reference, policy: HostPolicy | None = None,
               keychain: Keychain | None = None, *, name: str | None = None, retry: RetryPolicy | None = None,
               concurrency: int = 4, on_progress: Progress | None = None) -> ImageCache:
    """Fetch the artifact at ``source``, verify it, and register it as a Ready cache.

    The name is ``name`` or the pushed cache's; it must be free. Every part is
    verified as it arrives, the volume as a whole before it is registered. The
    cache's id is kept when free here (see ``_wanted_id``). Nothing is left behind
    on failure: no record, no partial file.
    """
    emit = on_progress or (lambda event: None)
    registry = _registry(source, policy, keychain, retry, push=False)
    fetched = registry.get_manifest(source.repository, source.identifier, source.digest)
    artifact = parse_artifact(fetched.raw, fetched.media_type, str(source))
    config = _read_config(registry, source, artifact)
    try:
        pushed_name, spec, _ = spec_from_object(config)
    except ValidationError as e:
        raise UnsupportedError(f"{source}: the artifact's ImageCache object is invalid: {e.message}") from None
    name = validate_name(name or pushed_name)
    if caches.exists(name):  # checked now so that nothing is downloaded for a name that cannot be used
        raise AlreadyExistsError(f"name {name!r}: an image cache with this name already exists (pass --name)")

    def write(partial: Path) -> ImportedVolume:
        emit(TransferPlanned(tuple(desc.size for desc, _ in artifact.parts)))
        _download(registry, source, artifact, partial, concurrency, emit)
        emit(Verifying(artifact.volume_size))
        volume = Volume.open(partial)
        report = volume.verify()
        if not report.ok:
            raise DigestMismatchError(f"{source}: the volume's blobs do not verify: {', '.join(report.corrupt[:3])}")
        images = _resolved_images(volume, str(source))
        status = config.get("status") if isinstance(config.get("status"), dict) else {}
        unpacked = status.get("unpackedBytes")
        return ImportedVolume(
            images, unpacked if isinstance(unpacked, int) and not isinstance(unpacked, bool) else 0,
            f"Imported from {source} ({artifact.digest}): {len(images)} images, volume of "
            f"{volume.content_bytes} bytes verified ({report.checked} blobs)")

    return caches.import_volume(name, spec, write, _wanted_id(config))


def _download(registry: Registry, source: Reference, artifact: Artifact, partial: Path, concurrency: int,
              emit: Progress) -> None:
    """Every part into its place in ``partial``, in parallel, each verified by digest."""
    try:
        fd = open_unlinked(partial, os.O_RDWR | os.O_TRUNC)  # a link planted there is replaced, not followed
    except OSError as e:
        raise StoreError(f"cannot create {partial}: {e.strerror}") from None
    lock = threading.Lock()
    total = len(artifact.parts)

    def one(i: int, desc: Descriptor, base: int) -> None:
        sink = _PartSink(fd, base, desc)

        def moved(n: int) -> None:
            with lock:
                emit(BytesMoved(n, i))

        _fetch(registry, source.repository, desc, sink, moved)
        sink.check()
        with lock:
            emit(PartDone(i, total, desc.size))

    try:
        _reserve(fd, artifact.volume_size, partial.parent)
        pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, total)), thread_name_prefix="imc-pull")
        try:
            futures = [pool.submit(one, i, desc, base) for i, (desc, base) in enumerate(artifact.parts)]
            for future in futures:
                future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failed part stops the parts not yet started
        os.fsync(fd)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StoreError(f"no space left in {partial.parent} while writing {partial.name}") from None
        raise StoreError(f"cannot write {partial}: {e.strerror}") from None
    finally:
        os.close(fd)
