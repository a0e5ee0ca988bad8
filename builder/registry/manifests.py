"""Manifests: fetched as exact bytes and verified, pushed by their bytes' digest.

A manifest is verified against every digest anyone claimed for it: the one asked for
and the registry's ``Docker-Content-Digest``. One larger than ``MAX_MANIFEST_SIZE`` is
refused before it is read in full.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

from builder.digest import Digest, verify_bytes
from builder.errors import BadReferenceError, DigestMismatchError, RegistryError, TransportError, UnsupportedError
from builder.oci import ACCEPT, MAX_MANIFEST_SIZE
from builder.registry.transport import READ_ERRORS, RegistryTransport


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest's exact bytes, its digest, and the media type the registry declared."""

    raw: bytes
    digest: Digest
    media_type: str


def get(transport: RegistryTransport, repository: str, identifier: str,
        expected: Digest | None = None) -> FetchedManifest:
    """Fetch a manifest's exact bytes (by tag or digest) and verify them."""

    def fetch(timeout: tuple[float, float]) -> tuple[bytes, str, str | None]:
        # A connection dropped mid-body is retried like one dropped before the answer.
        resp = transport.send("GET", f"/v2/{repository}/manifests/{identifier}", repository,
                              {"Accept": ACCEPT}, stream=True, timeout=timeout)
        with resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_MANIFEST_SIZE:
                raise UnsupportedError(f"{repository}:{identifier}: manifest of {length} bytes exceeds "
                                       f"the {MAX_MANIFEST_SIZE}-byte cap")
            raw = _read_limited(transport, resp, MAX_MANIFEST_SIZE, f"{repository}:{identifier}")
            if length and length.isdigit() and int(length) != len(raw):
                raise TransportError(f"{transport.endpoint}: manifest {repository}:{identifier} truncated "
                                     f"({len(raw)} of {length} bytes)")
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            return raw, media_type, resp.headers.get("Docker-Content-Digest")

    raw, media_type, claimed = transport.retrier.run(fetch)
    what = f"manifest {repository}@{identifier}"
    if claimed:
        try:
            claimed_digest = Digest.parse(claimed.strip())
        except Exception:
            raise DigestMismatchError(f"{what}: registry sent an invalid Docker-Content-Digest") from None
        verify_bytes(raw, claimed_digest, f"{what}: the registry claims {claimed_digest};")
    if expected:
        verify_bytes(raw, expected, f"{what}:")
    digest = expected or Digest.of(raw)
    return FetchedManifest(raw, digest, media_type)


def current_digest(transport: RegistryTransport, repository: str, identifier: str) -> Digest:
    """The digest ``identifier`` (a tag) points at now, without reading the manifest:
    a HEAD's ``Docker-Content-Digest``. A registry that sends none (or one that does not
    parse) is asked with a GET, and the digest is that of the bytes it sends. The Accept
    header is a pull's, so the registry names the same manifest a pull would get."""
    path = f"/v2/{repository}/manifests/{identifier}"

    def head(timeout: tuple[float, float]) -> str | None:
        resp = transport.send("HEAD", path, repository, {"Accept": ACCEPT}, timeout=timeout)
        resp.close()
        return resp.headers.get("Docker-Content-Digest")

    claimed = transport.retrier.run(head)
    if claimed:
        try:
            return Digest.parse(claimed.strip())
        except BadReferenceError:
            pass
    return get(transport, repository, identifier).digest


def _read_limited(transport: RegistryTransport, resp: requests.Response, limit: int, what: str) -> bytes:
    parts: list[bytes] = []
    total = 0
    try:
        for chunk in resp.iter_content(65536):
            total += len(chunk)
            if total > limit:
                raise UnsupportedError(f"{what}: manifest exceeds the {limit}-byte cap")
            parts.append(chunk)
    except READ_ERRORS as e:
        raise TransportError(f"{transport.endpoint}: connection lost reading {what}: {type(e).__name__}") from None
    return b"".join(parts)


def put(transport: RegistryTransport, repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
    """PUT a manifest's exact bytes under a tag (or digest); the digest the registry
    stored it under must be the digest of those bytes."""
    digest = Digest.of(raw)
    resp = transport.request("PUT", f"/v2/{repository}/manifests/{reference}", repository,
                             {"Content-Type": media_type}, data=raw)
    resp.close()
    if resp.status_code not in (200, 201, 204):
        raise RegistryError(f"{transport.endpoint}: PUT manifest {repository}:{reference} answered "
                            f"{resp.status_code}", resp.status_code)
    claimed = resp.headers.get("Docker-Content-Digest")
    if claimed and claimed.strip() != str(digest):
        raise DigestMismatchError(f"{transport.endpoint}: manifest {repository}:{reference} was stored as "
                                  f"{claimed}, its bytes hash to {digest}")
    return digest
