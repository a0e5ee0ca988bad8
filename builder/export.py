"""Exporting a volume's images as an archive that other tools load.

Two formats, because no one format is taken whole by every loader:

``docker-archive``
    ``manifest.json`` listing every image by its config, its tags (``RepoTags``) and
    its layer files, which is what ``docker load`` and ``podman load`` read whole.
    The format has no registry manifest: a loader rebuilds the image from the config
    and the layers, so the image ID (the config's digest) is the one a pull gives,
    while the manifest digest is not carried. Layers go in as the registry served
    them, compressed or not: the loaders detect the compression by content and check
    the decompressed bytes against the config's ``diff_ids``, so nothing is rewritten.
``oci-archive``
    An OCI image layout, one ``index.json`` entry per image named by
    ``org.opencontainers.image.ref.name``, for ``skopeo copy`` (and ``podman load``
    when it holds one image). Docker-typed manifests are rewritten as equivalent OCI
    manifests, because skopeo reads only OCI-typed manifests from a layout.

Either is written strictly forward (a pipe works as well as a file), every blob once
however many images share it, read from the volume and rehashed as it goes by. A file
is written unnamed in the target's directory and linked into place only when complete
(``O_TMPFILE``; a hidden ``.partial`` beside it, removed on failure, where the file
system lacks that), so an interrupted export, even a killed one, leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from builder import faults
from builder.digest import Digest, Verifier
from builder.errors import BadReferenceError, NotFoundLocalError, StoreError, ValidationError
from builder.oci import (
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
)
from builder.reference import parse as parse_reference
from builder.store import LAYOUT_VERSION, REF_NAME, fsync_dir
from builder.volume import Volume

DOCKER_ARCHIVE = "docker-archive"
OCI_ARCHIVE = "oci-archive"
FORMATS = (DOCKER_ARCHIVE, OCI_ARCHIVE)

_DOCKER_TO_OCI = {
    DOCKER_CONFIG: OCI_CONFIG,
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_LIST: OCI_INDEX,
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip":
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
}

# skopeo's (containers/image) rule for an OCI layout's ref.name annotation.
_REF_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME_RE = re.compile(rf"^{_REF_COMPONENT}(?:/{_REF_COMPONENT})*\Z")

_WRITE_CHUNK = 1 << 20


@dataclass
class _Plan:
    """What an archive holds, in the order it is written: generated files (``head``),
    blobs from the volume, then generated blobs (``extra``, the rewritten manifests)."""

    images: list[str]
    head: list[tuple[str, bytes]]
    blobs: list[Digest]
    extra: dict[Digest, bytes] = field(default_factory=dict)


# -- choosing images -------------------------------------------------------------------


def _select(volume: Volume, names: Sequence[str]) -> list[dict[str, Any]]:
    """The volume's images, or those named (by the name the cache holds them under, or
    any spelling of the same reference); ``NotFoundLocalError`` for a name it lacks."""
    images = [i for i in volume.meta.get("images") or [] if isinstance(i, dict)]
    if not names:
        return images

    def key(name: str) -> str:
        try:
            return str(parse_reference(name))
        except BadReferenceError:
            return name

    by_key = {key(str(i.get("name", ""))): i for i in images}
    chosen: list[dict[str, Any]] = []
    for name in names:
        image = next((i for i in images if i.get("name") == name), None) or by_key.get(key(name))
        if image is None:
            held = ", ".join(str(i.get("name")) for i in images) or "no images"
            raise NotFoundLocalError(f"image {name} is not in cache {volume.meta.get('cache', volume.path.name)} "
                                     f"(it holds {held})")
        if image not in chosen:
            chosen.append(image)
    return chosen


def _manifest_of(volume: Volume, image: dict[str, Any]) -> tuple[str, Digest, str]:
    name = str(image.get("name", ""))
    try:
        digest = Digest.parse(str(image["digest"]))
    except (KeyError, BadReferenceError):
        raise ValidationError(f"image {name} has no valid manifest digest in the volume's index") from None
    if not volume.has(digest):
        raise NotFoundLocalError(f"the manifest of image {name} ({digest}) is not in volume {volume.path.name}")
    media_type = str(image.get("mediaType") or volume.entry(digest).media_type)
    if media_type not in (*MANIFEST_TYPES, *INDEX_TYPES):
        raise ValidationError(f"image {name} has media type {media_type!r}, not a manifest or index")
    return name, digest, media_type


def _json(volume: Volume, digest: Digest, what: str) -> Any:
    try:
        return json.loads(volume.read_bytes(digest))
    except ValueError as e:
        raise ValidationError(f"{what} {digest} is not valid JSON ({e})") from None


def _closure(volume: Volume, digest: Digest, media_type: str, out: dict[Digest, None]) -> None:
    """``digest`` and every blob it references that the volume holds, in order."""
    out[digest] = None
    doc = _json(volume, digest, "manifest")
    try:
        if media_type in INDEX_TYPES:
            for child in doc["manifests"]:
                child_digest = Digest.parse(child["digest"])
                if volume.has(child_digest) and child.get("mediaType") in (*MANIFEST_TYPES, *INDEX_TYPES):
                    _closure(volume, child_digest, child["mediaType"], out)
            return
        for blob in (doc["config"], *doc["layers"]):
            blob_digest = Digest.parse(blob["digest"])
            if volume.has(blob_digest):
                out[blob_digest] = None
    except (KeyError, TypeError, AttributeError, BadReferenceError) as e:
        raise ValidationError(f"manifest {digest} is malformed ({e})") from None


# -- oci-archive -----------------------------------------------------------------------


def _convert_docker(volume: Volume, digest: Digest, media_type: str, extra: dict[Digest, bytes]) -> Descriptor:
    """The descriptor to list for a manifest or index: itself when OCI-typed, else an
    equivalent OCI document (added to ``extra``) with the same config and layer blobs.

    skopeo reads only OCI-typed manifests from an OCI layout, so a Docker-typed image
    is exported as an OCI manifest whose digest differs from the registry's.
    """
    if media_type not in (DOCKER_MANIFEST, DOCKER_LIST):
        return Descriptor(media_type, digest, volume.entry(digest).size)
    try:
        return _convert_docker_doc(volume, digest, media_type, json.loads(volume.read_bytes(digest)), extra)
    except (ValueError, KeyError, TypeError, AttributeError, BadReferenceError) as e:
        raise ValidationError(f"manifest {digest} cannot be exported as OCI: malformed ({e})") from None


def _convert_docker_doc(volume: Volume, digest: Digest, media_type: str, doc: Any,
                        extra: dict[Digest, bytes]) -> Descriptor:
    if media_type == DOCKER_MANIFEST:
        doc["config"]["mediaType"] = _DOCKER_TO_OCI.get(doc["config"].get("mediaType", ""),
                                                        doc["config"].get("mediaType", OCI_CONFIG))
        for layer in doc["layers"]:
            layer["mediaType"] = _DOCKER_TO_OCI.get(layer.get("mediaType", ""), layer.get("mediaType", ""))
    else:
        children = []
        for child in doc["manifests"]:
            child_digest = Digest.parse(child["digest"])
            child_type = child.get("mediaType", "")
            if child_type in _DOCKER_TO_OCI and volume.has(child_digest):
                new = _convert_docker(volume, child_digest, child_type, extra)
                child = {**child, "mediaType": new.media_type, "digest": str(new.digest), "size": new.size}
            children.append(child)
        doc["manifests"] = children
    doc["mediaType"] = _DOCKER_TO_OCI[media_type]
    data = json.dumps(doc, indent=3).encode()
    new_digest = Digest.of(data, digest.algorithm)
    extra[new_digest] = data
    return Descriptor(doc["mediaType"], new_digest, len(data))


def _plan_oci(volume: Volume, images: list[dict[str, Any]], whole: bool) -> _Plan:
    """Every blob of the volume (``whole``), or only the chosen images' blobs."""
    extra: dict[Digest, bytes] = {}
    index_entries = []
    blobs: dict[Digest, None] = dict.fromkeys(volume.entries) if whole else {}
    for image in images:
        name, digest, media_type = _manifest_of(volume, image)
        if not _REF_NAME_RE.match(name):
            raise ValidationError(f"image name {name!r} cannot name an image in an OCI archive")
        desc = _convert_docker(volume, digest, media_type, extra)
        entry = desc.to_json()
        entry["annotations"] = {REF_NAME: name}
        index_entries.append(entry)
        if not whole:
            _closure(volume, digest, media_type, blobs)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
    head = [("oci-layout", json.dumps(LAYOUT_VERSION).encode()), ("index.json", json.dumps(index, indent=1).encode())]
    return _Plan([str(i.get("name")) for i in images], head, list(blobs),
                 {d: data for d, data in extra.items() if d not in blobs})


# -- docker-archive --------------------------------------------------------------------


def repo_tag(name: str) -> str | None:
    """The ``RepoTags`` entry for an image held under ``name``: the name with its tag
    and without a digest (``alpine`` becomes ``alpine:latest``); None for an image
    named by digest alone, which a docker-archive can only list untagged."""
    try:
        ref = parse_reference(name)
    except BadReferenceError:
        raise ValidationError(f"image name {name!r} is not a valid reference for a docker-archive tag") from None
    if ref.tag is None:
        return None
    text = name.partition("@")[0]
    return text if text.endswith(f":{ref.tag}") else f"{text}:{ref.tag}"


def _plan_docker(volume: Volume, images: list[dict[str, Any]]) -> _Plan:
    entries: dict[tuple[Digest, tuple[Digest, ...]], dict[str, Any]] = {}
    blobs: dict[Digest, None] = {}
    for image in images:
        name, digest, media_type = _manifest_of(volume, image)
        if media_type in INDEX_TYPES:
            raise ValidationError(f"image {name} is a multi-platform index; a docker-archive holds one platform "
                                  "per image")
        doc = _json(volume, digest, "manifest")
        try:
            config = Digest.parse(doc["config"]["digest"])
            config_type = doc["config"].get("mediaType", "")
            layers = tuple(Digest.parse(layer["digest"]) for layer in doc["layers"])
        except (KeyError, TypeError, AttributeError, BadReferenceError) as e:
            raise ValidationError(f"manifest {digest} of image {name} is malformed ({e})") from None
        if config_type not in (DOCKER_CONFIG, OCI_CONFIG):
            raise ValidationError(f"image {name} is not a container image (its config is {config_type!r}); "
                                  "a docker-archive holds container images only")
        for blob in (config, *layers):
            if not volume.has(blob):
                raise NotFoundLocalError(f"blob {blob} of image {name} is not in volume {volume.path.name} "
                                         "(a foreign layer the registry does not serve?)")
        try:
            diff_ids = _json(volume, config, "image config")["rootfs"]["diff_ids"]
        except (KeyError, TypeError) as e:
            raise ValidationError(f"the config of image {name} has no rootfs.diff_ids ({e})") from None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise ValidationError(f"image {name} has {len(layers)} layers but its config lists "
                                  f"{len(diff_ids) if isinstance(diff_ids, list) else 'no'} diff_ids")
        entry = entries.setdefault((config, layers), {
            "Config": _blob_path(config), "RepoTags": [], "Layers": [_blob_path(d) for d in layers]})
        tag = repo_tag(name)
        if tag and tag not in entry["RepoTags"]:
            entry["RepoTags"].append(tag)
        blobs.update(dict.fromkeys((config, *layers)))
    head = [("manifest.json", json.dumps(list(entries.values()), indent=1).encode())]
    return _Plan([str(i.get("name")) for i in images], head, list(blobs))


# -- writing ---------------------------------------------------------------------------


def _blob_path(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


class _TarWriter:
    """A POSIX tar written strictly forward through ``sink`` (a file or a pipe), the
    same bytes ``tarfile`` writes, without its need to seek or to buffer a member."""

    def __init__(self, sink: BinaryIO, mtime: int) -> None:
        self._sink = sink
        self._mtime = mtime
        self._written = 0

    def _write(self, data: bytes | memoryview) -> None:
        self._sink.write(data)
        self._written += len(data)

    def _header(self, name: str, size: int, kind: bytes, mode: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.type = size, mode, self._mtime, kind
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _pad(self, size: int) -> None:
        if size % tarfile.BLOCKSIZE:
            self._write(bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def directory(self, name: str) -> None:
        self._header(name, 0, tarfile.DIRTYPE, 0o755)

    def file(self, name: str, data: bytes) -> None:
        self._header(name, len(data), tarfile.REGTYPE, 0o644)
        self._write(data)
        self._pad(len(data))

    def blob(self, volume: Volume, digest: Digest) -> None:
        """A blob from the volume, rehashed as it goes by (``DigestMismatchError``)."""
        size = volume.entry(digest).size
        self._header(_blob_path(digest), size, tarfile.REGTYPE, 0o644)
        verifier = Verifier(digest, size, f"blob {digest} in volume {volume.path.name}")
        for piece in volume.read_range(digest, 0, size):
            verifier.update(piece)
            self._write(piece)
        verifier.verify()
        self._pad(size)

    def close(self) -> None:
        """The end-of-archive blocks, padded to a whole record as ``tarfile`` does."""
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._pad_record()

    def _pad_record(self) -> None:
        if self._written % tarfile.RECORDSIZE:
            self._write(bytes(tarfile.RECORDSIZE - self._written % tarfile.RECORDSIZE))


def _write(volume: Volume, plan: _Plan, sink: BinaryIO) -> None:
    mtime = int(datetime.datetime.strptime(volume.created, "%Y-%m-%dT%H:%M:%SZ")
                .replace(tzinfo=datetime.UTC).timestamp())
    tar = _TarWriter(sink, mtime)
    for name, data in plan.head:
        tar.file(name, data)
    for dirname in ("blobs/", *sorted({f"blobs/{d.algorithm}/" for d in (*plan.blobs, *plan.extra)})):
        tar.directory(dirname)
    for n, digest in enumerate(plan.blobs):
        tar.blob(volume, digest)
        if 0 < n + 1 < len(plan.blobs):
            faults.checkpoint("export-midway")
    for digest, data in plan.extra.items():
        tar.file(_blob_path(digest), data)
    tar.close()


def _plan(volume: Volume, fmt: str, names: Sequence[str]) -> _Plan:
    if fmt not in FORMATS:
        raise ValidationError(f"unknown archive format {fmt!r} (known: {', '.join(FORMATS)})")
    images = _select(volume, names)
    if not images:
        raise ValidationError(f"cache {volume.meta.get('cache', volume.path.name)} holds no images to export")
    return _plan_docker(volume, images) if fmt == DOCKER_ARCHIVE else _plan_oci(volume, images, whole=not names)


def stream_archive(volume: Volume, fmt: str, sink: BinaryIO, names: Sequence[str] = ()) -> list[str]:
    """Write the archive to ``sink`` (a pipe, say); returns the names of the images in it.

    Everything is checked before the first byte is written, except the blobs' bytes,
    which are rehashed as they go (a pipe cannot take back what it has been sent).
    """
    plan = _plan(volume, fmt, names)
    _write(volume, plan, sink)
    sink.flush()
    return plan.images


def export_archive(volume: Volume, fmt: str, out: Path, names: Sequence[str] = ()) -> list[str]:
    """Write the archive as the file ``out``, which appears only when complete.

    Returns the names of the images in it. Any failure, an exception or the process
    being killed, leaves ``out`` as it was and no partial file beside it.
    """
    out = Path(out)
    plan = _plan(volume, fmt, names)
    try:
        with _Unnamed(out) as f:
            _write(volume, plan, f.file)
            f.publish()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StoreError(f"no space left in {out.parent} while writing {out.name}") from None
        raise StoreError(f"cannot write {fmt} {out}: {e.strerror or e}") from None
    return plan.images


class _Unnamed:
    """A file being written in ``out``'s directory without a name (``O_TMPFILE``), so
    that a killed writer leaves nothing; ``publish`` links it in as ``out``. Where the
    file system cannot, a hidden ``.<name>.<pid>.partial`` stands in, removed on any
    exception (only a killed process can leave it)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._named: Path | None = None
        try:
            fd = os.open(out.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self._named = out.with_name(f".{out.name}.{os.getpid()}.partial")
            fd = os.open(self._named, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        self.file: BinaryIO = os.fdopen(fd, "wb", buffering=_WRITE_CHUNK)

    def __enter__(self) -> _Unnamed:
        return self

    def publish(self) -> None:
        """fsync the file, then give it its name (replacing any file there)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        if self._named is None:
            link = self.out.with_name(f".{self.out.name}.{os.getpid()}.link")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            # linkat(AT_SYMLINK_FOLLOW) names the open file itself; plain link() (what
            # os.link does without a directory descriptor) would link the /proc symlink.
            dir_fd = os.open(self.out.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.link(f"/proc/self/fd/{self.file.fileno()}", link.name, dst_dir_fd=dir_fd, follow_symlinks=True)
            finally:
                os.close(dir_fd)
            self._named = link
        os.replace(self._named, self.out)
        self._named = None
        fsync_dir(self.out.parent)

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        if self._named is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._named)

