"""OCI and Docker media types, descriptors, and manifests parsed from their exact bytes.

A manifest's identity is the hash of its bytes as the registry sent them, so the bytes
travel with the parsed form and are never re-serialised.
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from builder.digest import Digest
from builder.errors import BadReferenceError, UnsupportedError, ValidationError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
# The Accept list a registry needs to hand out every modern type; without the index
# types, registry:2 answers 404 for a multi-arch tag.
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}

ATTESTATION_REF_TYPE = "attestation-manifest"
MAX_MANIFEST_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class Platform:
    """os/architecture[/variant], as in an index entry."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``linux/amd64`` or ``linux/arm64/v8``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValidationError(f"invalid platform {text!r}: want os/arch[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine, in Go's naming."""
        machine = _platform.machine().lower()
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                "armv7l": "arm", "i386": "386", "i686": "386", "ppc64le": "ppc64le",
                "s390x": "s390x", "riscv64": "riscv64"}.get(machine, machine)
        variant = "v7" if machine == "armv7l" else None
        return cls("linux", arch, variant)

    def to_json(self) -> dict[str, str]:
        """The OCI ``platform`` object."""
        out = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            out["variant"] = self.variant
        return out

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob is, how big, and its digest."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_json(cls, obj: Any) -> Descriptor:
        """Parse a descriptor object, refusing one without a valid digest and size."""
        if not isinstance(obj, dict):
            raise ValidationError("malformed descriptor: not an object")
        try:
            digest = Digest.parse(str(obj.get("digest", "")))
        except BadReferenceError as e:
            raise ValidationError(f"malformed descriptor: {e.message}") from None
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValidationError(f"malformed descriptor for {digest}: bad size {size!r}")
        plat = obj.get("platform")
        platform = None
        if isinstance(plat, dict) and plat.get("os") and plat.get("architecture"):
            platform = Platform(str(plat["os"]), str(plat["architecture"]), plat.get("variant"))
        annotations = obj.get("annotations") or {}
        return cls(str(obj.get("mediaType", "")), digest, size, platform,
                   {str(k): str(v) for k, v in annotations.items()} if isinstance(annotations, dict) else {})

    def to_json(self) -> dict[str, Any]:
        """The descriptor as JSON."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.platform:
            out["platform"] = self.platform.to_json()
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @property
    def is_attestation(self) -> bool:
        """True for buildkit's attestation entries, which are not runnable images."""
        if self.annotations.get("vnd.docker.reference.type") == ATTESTATION_REF_TYPE:
            return True
        return self.platform is not None and self.platform.os == "unknown"


@dataclass(frozen=True)
class Manifest:
    """An image manifest: a config and layers, with the exact bytes it came from."""

    media_type: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def digest(self) -> Digest:
        return Digest.of(self.raw)

    def blobs(self) -> tuple[Descriptor, ...]:
        """Config first, then layers: every blob the image needs besides the manifest."""
        return (self.config, *self.layers)


@dataclass(frozen=True)
class Index:
    """An OCI index or Docker manifest list, with its exact bytes."""

    media_type: str
    raw: bytes
    manifests: tuple[Descriptor, ...]

    @property
    def digest(self) -> Digest:
        return Digest.of(self.raw)

    def select(self, want: Platform) -> Descriptor:
        """The entry for ``want``, skipping attestations; a missing variant matches any."""
        candidates = [d for d in self.manifests if d.platform and not d.is_attestation]
        for d in candidates:
            p = d.platform
            assert p is not None
            if p.os == want.os and p.architecture == want.architecture and (
                want.variant is None or p.variant in (None, want.variant)
            ):
                return d
        have = ", ".join(str(d.platform) for d in candidates) or "none"
        raise UnsupportedError(f"no image for platform {want} in the index (has: {have})")


def detect_media_type(raw: bytes, header_type: str | None) -> str:
    """The manifest's media type: its own ``mediaType`` field wins over the header."""
    try:
        obj = json.loads(raw)
    except ValueError:
        raise UnsupportedError("manifest is not valid JSON") from None
    if not isinstance(obj, dict):
        raise UnsupportedError("manifest is not a JSON object")
    declared = obj.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if obj.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    if "manifests" in obj:
        return OCI_INDEX
    if "layers" in obj:
        return OCI_MANIFEST
    return (header_type or "").split(";")[0].strip()


def parse_manifest(raw: bytes, header_type: str | None = None) -> Manifest | Index:
    """Parse a manifest or index from its exact bytes; refuse what imc cannot pull."""
    if len(raw) > MAX_MANIFEST_SIZE:
        raise UnsupportedError(f"manifest of {len(raw)} bytes exceeds the {MAX_MANIFEST_SIZE}-byte cap")
    media_type = detect_media_type(raw, header_type)
    if media_type in DOCKER_SCHEMA1:
        raise UnsupportedError(
            "Docker schema 1 manifests are not supported (deprecated); push the image again with a current client"
        )
    obj = json.loads(raw)
    try:
        if media_type in INDEX_TYPES:
            entries = obj.get("manifests")
            if not isinstance(entries, list):
                raise ValidationError("index has no manifests list")
            return Index(media_type, raw, tuple(Descriptor.from_json(m) for m in entries))
        if media_type in MANIFEST_TYPES:
            layers = obj.get("layers")
            if not isinstance(layers, list):
                raise ValidationError("manifest has no layers list")
            return Manifest(media_type, raw, Descriptor.from_json(obj.get("config")),
                            tuple(Descriptor.from_json(layer) for layer in layers))
    except ValidationError as e:
        raise UnsupportedError(f"malformed manifest: {e.message}") from None
    raise UnsupportedError(f"unsupported manifest media type {media_type!r}")


def layer_compression(media_type: str) -> str | None:
    """'gzip', 'zstd' or 'none' for a known layer type; None for anything else."""
    return LAYER_TYPES.get(media_type)
