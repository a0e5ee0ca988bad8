"""Exporting a volume as an archive that other tools load.

``oci-archive``: an OCI image layout in a tar, one ``index.json`` entry per image
named by ``org.opencontainers.image.ref.name``, for ``skopeo copy`` and ``podman
load``. Docker-typed manifests are rewritten as equivalent OCI manifests, because
skopeo reads only OCI-typed manifests from a layout.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from builder.digest import Digest
from builder.errors import BadReferenceError, DigestMismatchError, StoreError, ValidationError
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
from builder.store import LAYOUT_VERSION, REF_NAME, fsync_dir
from builder.volume import Volume

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


class _HashingReader:
    """Passes a blob's bytes through to tarfile, hashing them on the way."""

    def __init__(self, src: BinaryIO, digest: Digest) -> None:
        self._src = src
        self.hash = digest.hasher()

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self.hash.update(data)
        return data


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


def export_oci_archive(volume: Volume, out: Path) -> None:
    """Write the volume as an ``oci-archive`` tar that ``skopeo copy`` and ``podman
    load`` accept: an OCI image layout with every blob and one ``index.json`` entry
    per image, named by ``org.opencontainers.image.ref.name``.

    Docker-typed manifests are exported as equivalent OCI manifests (the same config
    and layer blobs under OCI media types), because skopeo reads only OCI-typed
    manifests from a layout: for those images the manifest digest differs from the
    registry's while every layer and config is byte-identical. Every blob is rehashed
    while it is written (``DigestMismatchError`` on damage); the archive appears at
    ``out`` only when complete.
    """
    out = Path(out)
    images = volume.meta.get("images") or []
    extra: dict[Digest, bytes] = {}
    index_entries = []
    for image in images:
        name = str(image.get("name", ""))
        if not _REF_NAME_RE.match(name):
            raise ValidationError(f"image name {name!r} cannot name an image in an OCI archive")
        digest = Digest.parse(str(image["digest"]))
        media_type = str(image.get("mediaType") or volume.entry(digest).media_type)
        if media_type not in (*MANIFEST_TYPES, *INDEX_TYPES):
            raise ValidationError(f"image {name} has media type {media_type!r}, not a manifest or index")
        desc = _convert_docker(volume, digest, media_type, extra)
        entry = desc.to_json()
        entry["annotations"] = {REF_NAME: name}
        index_entries.append(entry)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
    mtime = int(datetime.datetime.strptime(volume.created, "%Y-%m-%dT%H:%M:%SZ")
                .replace(tzinfo=datetime.UTC).timestamp())
    partial = out.with_name(out.name + ".partial")

    def member(name: str, size: int, mode: int = 0o644, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.type = size, mode, mtime, kind
        return info

    try:
        with open(partial, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.copybufsize = 1 << 20
                for small_name, data in (("oci-layout", json.dumps(LAYOUT_VERSION).encode()),
                                         ("index.json", json.dumps(index, indent=1).encode())):
                    tar.addfile(member(small_name, len(data)), io.BytesIO(data))
                for dirname in ("blobs/", *sorted({f"blobs/{d.algorithm}/" for d in (*volume.entries, *extra)})):
                    tar.addfile(member(dirname, 0, 0o755, tarfile.DIRTYPE))
                for digest, e in volume.entries.items():
                    with volume.open_blob(digest) as src:
                        reader = _HashingReader(src, digest)
                        tar.addfile(member(f"blobs/{digest.algorithm}/{digest.hex}", e.size), reader)
                    if reader.hash.hexdigest() != digest.hex:
                        raise DigestMismatchError(f"blob {digest} in volume {volume.path.name} is corrupt")
                for digest, data in extra.items():
                    if digest not in volume.entries:
                        tar.addfile(member(f"blobs/{digest.algorithm}/{digest.hex}", len(data)), io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, out)
        fsync_dir(out.parent)
    except OSError as e:
        _remove(partial)
        raise StoreError(f"cannot write OCI archive {out}: {e.strerror or e}") from None
    except BaseException:
        _remove(partial)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
