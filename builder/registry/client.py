"""The registry client: one object per endpoint for the rest of imc to hold.

``Registry`` is a facade. The exchange itself (sessions, auth challenges and tokens,
redirects that never carry credentials to another host, errors) is the
``RegistryTransport``; retries and their limits are the ``Retrier``; what is sent is
in ``manifests``, ``blobs`` and ``uploads``. Pushing (``Registry(..., push=True)``)
asks for ``repository:NAME:pull,push`` tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from builder.digest import Digest
from builder.registry import blobs, manifests, uploads
from builder.registry.auth import Keychain, TokenCache
from builder.registry.blobs import BlobSink
from builder.registry.hosts import HostPolicy
from builder.registry.manifests import FetchedManifest
from builder.registry.retry import RetryPolicy
from builder.registry.transport import RegistryTransport
from builder.registry.uploads import UPLOAD_CHUNK


class Registry:
    """A client for one registry endpoint (``host`` or ``host:port``), thread-safe."""

    def __init__(
        self,
        endpoint: str,
        policy: HostPolicy | None = None,
        keychain: Keychain | None = None,
        tokens: TokenCache | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        push: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.transport = RegistryTransport(endpoint, policy, keychain, tokens, retry, sleep, push)

    def get_manifest(self, repository: str, identifier: str, expected: Digest | None = None) -> FetchedManifest:
        return manifests.get(self.transport, repository, identifier, expected)

    def current_digest(self, repository: str, tag: str) -> Digest:
        """The digest a tag points at now (HEAD, or GET and hashing when the registry
        does not say)."""
        return manifests.current_digest(self.transport, repository, tag)

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
        return manifests.put(self.transport, repository, reference, raw, media_type)

    def fetch_blob(self, repository: str, digest: Digest, size: int, sink: BlobSink,
                   on_bytes: Callable[[int], None] | None = None) -> None:
        blobs.fetch(self.transport, repository, digest, size, sink, on_bytes)

    def blob_size(self, repository: str, digest: Digest) -> int:
        return blobs.size_of(self.transport, repository, digest)

    def blob_exists(self, repository: str, digest: Digest) -> bool:
        return blobs.exists(self.transport, repository, digest)

    def upload_blob(self, repository: str, digest: Digest, data: bytes) -> None:
        uploads.upload(self.transport, repository, digest, data)

    def upload_blob_chunked(self, repository: str, digest: Digest, size: int, read: Callable[[int, int], bytes],
                            chunk_size: int = UPLOAD_CHUNK, on_bytes: Callable[[int], None] | None = None) -> int:
        return uploads.upload_chunked(self.transport, repository, digest, size, read, chunk_size, on_bytes)
