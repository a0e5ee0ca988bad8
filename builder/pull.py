"""Pulling an image set into the store: resolve every manifest, fetch what is missing.

Data flows one way: references → verified manifests → a de-duplicated set of blobs
→ parallel downloads into the store → image entries in the store's index. An image
is recorded only after every blob it needs is stored, so a name in the index always
points at complete content. Progress is reported as events; nothing here prints.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from builder.digest import Digest
from builder.errors import ImcError
from builder.oci import Descriptor, Index, Manifest, Platform, parse_manifest
from builder.reference import Reference
from builder.registry.auth import Keychain, TokenCache
from builder.registry.blobs import BlobSink
from builder.registry.client import Registry
from builder.registry.hosts import HostPolicy
from builder.registry.retry import RetryPolicy
from builder.store import Store
from builder.throughput import TransferLog

DEFAULT_CONCURRENCY = 4

REGISTRY = "registry"
STORE = "store"


@dataclass(frozen=True)
class ImageResolved:
    """An image's manifest is fetched and verified (``size`` bytes of manifest)."""

    image: str
    digest: Digest
    size: int


@dataclass(frozen=True)
class PullPlanned:
    """The distinct blobs the pull needs, counted once however many images share them."""

    blobs: int
    size: int


@dataclass(frozen=True)
class BlobStarted:
    """A blob's download from the registry begins, at ``offset`` when a partial is resumed."""

    image: str
    digest: Digest
    size: int
    media_type: str
    offset: int


@dataclass(frozen=True)
class BlobProgress:
    """``delta`` more bytes of a blob arrived; negative when its download restarts."""

    image: str
    digest: Digest
    size: int
    media_type: str
    delta: int


@dataclass(frozen=True)
class BlobDone:
    """A blob is in the store; ``origin`` says where it came from (``registry``,
    ``store``, or the name of the local source it was copied from)."""

    image: str
    digest: Digest
    size: int
    media_type: str
    origin: str

    @property
    def reused(self) -> bool:
        return self.origin != REGISTRY


@dataclass(frozen=True)
class ImageDone:
    """An image is complete in the store, with the bytes this pull fetched and reused for it."""

    image: str
    digest: Digest
    bytes_fetched: int
    bytes_reused: int


PullEvent = ImageResolved | PullPlanned | BlobStarted | BlobProgress | BlobDone | ImageDone
"""One step of a pull, for whoever renders progress: one type per kind of step."""


class BlobSource(Protocol):
    """Somewhere local that may hold a blob, tried before the network (another cache)."""

    name: str

    def open_blob(self, digest: Digest) -> BinaryIO | None:
        """A stream of the blob's bytes, or None if this source does not hold it."""


@dataclass
class BlobOutcome:
    """A blob of a pulled image, and where this pull got it: ``registry`` (fetched),
    ``store`` (already held), or the name of the local source it was copied from."""

    descriptor: Descriptor
    origin: str

    @property
    def fetched(self) -> bool:
        return self.origin == REGISTRY


@dataclass
class PulledImage:
    """An image now complete in the store."""

    reference: Reference
    name: str
    manifest: Manifest
    descriptor: Descriptor
    index_digest: Digest | None
    platform: Platform | None
    blobs: list[BlobOutcome] = field(default_factory=list)

    @property
    def bytes_fetched(self) -> int:
        return sum(b.descriptor.size for b in self.blobs if b.fetched)

    @property
    def bytes_reused(self) -> int:
        return sum(b.descriptor.size for b in self.blobs if not b.fetched)


@dataclass
class PullResult:
    """Every image of a pull, and the blob totals with each shared blob counted once."""

    images: list[PulledImage]
    bytes_fetched: int
    bytes_reused: int
    blobs_fetched: int
    blobs_reused: int


@dataclass(frozen=True)
class _Resolved:
    reference: Reference
    manifest: Manifest
    descriptor: Descriptor
    index_digest: Digest | None
    platform: Platform | None
    registry: Registry
    index_size: int = 0


class _Cancelled(Exception):
    """Raised inside a download when another one failed and the pull is giving up."""


class Puller:
    """Pulls image sets into one store, reusing every blob it already holds."""

    def __init__(
        self,
        store: Store,
        policy: HostPolicy | None = None,
        keychain: Keychain | None = None,
        platform: Platform | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_event: Callable[[PullEvent], None] | None = None,
        retry: RetryPolicy | None = None,
        tokens: TokenCache | None = None,
        sources: Sequence[BlobSource] = (),
    ) -> None:
        self.store = store
        self.policy = policy or HostPolicy()
        self.keychain = keychain or Keychain()
        self.platform = platform or Platform.host()
        self.concurrency = max(1, concurrency)
        self._emit = on_event or (lambda event: None)
        self._retry = retry
        self._tokens = tokens or TokenCache()
        self.sources = tuple(sources)
        self._registries: dict[str, Registry] = {}
        self._lock = threading.Lock()

    def with_retry(self, retry: RetryPolicy) -> Puller:
        """A puller like this one (store, hosts, credentials, tokens, sources, events)
        under another retry policy: a server bounds each pull-through by its own deadline."""
        return Puller(self.store, self.policy, self.keychain, self.platform, self.concurrency, self._emit, retry,
                      self._tokens, self.sources)

    def registry(self, endpoint: str) -> Registry:
        """The client for ``endpoint``, shared by every image of this puller."""
        with self._lock:
            if endpoint not in self._registries:
                self._registries[endpoint] = Registry(endpoint, self.policy, self.keychain, self._tokens, self._retry)
            return self._registries[endpoint]

    def resolve(self, ref: Reference, keep_index: bool = True) -> _Resolved:
        """Fetch and verify the image's manifest, choosing a platform from an index;
        the index is stored unless ``keep_index`` is False (a plan writes nothing)."""
        registry = self.registry(ref.api_host)
        fetched = registry.get_manifest(ref.repository, ref.identifier, ref.digest)
        node = parse_manifest(fetched.raw, fetched.media_type)
        index_digest = None
        index_size = 0
        platform = None
        if isinstance(node, Index):
            if keep_index:
                self.store.put_bytes(fetched.digest, fetched.raw)
            index_digest, index_size = fetched.digest, len(fetched.raw)
            entry = node.select(self.platform)
            platform = entry.platform
            fetched = registry.get_manifest(ref.repository, str(entry.digest), entry.digest)
            node = parse_manifest(fetched.raw, fetched.media_type)
            if isinstance(node, Index):
                raise ImcError(f"{ref}: nested indexes are not supported")
        descriptor = Descriptor(node.media_type, fetched.digest, len(fetched.raw), platform)
        self._emit(ImageResolved(str(ref), fetched.digest, len(fetched.raw)))
        return _Resolved(ref, node, descriptor, index_digest, platform, registry, index_size)

    def pull(self, refs: list[Reference], record: bool = True) -> PullResult:
        """Pull every image; raise the first error after stopping the other downloads.

        With ``record`` each image is named in the store's index (so it stays until
        removed); without it the caller holds the blobs by other means, and must do
        so inside its own ``store.pinning()`` to keep gc off them.
        """
        with self.store.pinning():
            resolved = [self.resolve(ref) for ref in refs]
            jobs: dict[Digest, tuple[_Resolved, Descriptor]] = {}
            for image in resolved:
                for desc in image.manifest.blobs():
                    jobs.setdefault(desc.digest, (image, desc))
            self._emit(PullPlanned(blobs=len(jobs), size=sum(desc.size for _, desc in jobs.values())))
            started = time.monotonic()
            origins = self._fetch_all(jobs)
            TransferLog(self.store.home).record(
                sum(desc.size for d, (_, desc) in jobs.items() if origins[d] == REGISTRY), time.monotonic() - started)
            images = []
            for image in resolved:
                self.store.put_bytes(image.descriptor.digest, image.manifest.raw)
                name = str(image.reference)
                if record:
                    self.store.add_image(name, image.descriptor, image.index_digest)
                pulled = PulledImage(image.reference, name, image.manifest, image.descriptor, image.index_digest,
                                     image.platform,
                                     [BlobOutcome(d, origins[d.digest]) for d in image.manifest.blobs()])
                images.append(pulled)
                self._emit(ImageDone(name, image.descriptor.digest, bytes_fetched=pulled.bytes_fetched,
                                     bytes_reused=pulled.bytes_reused))
        fetched = {d: origins[d] == REGISTRY for d in jobs}
        sizes = {d: jobs[d][1].size for d in jobs}
        return PullResult(
            images,
            bytes_fetched=sum(size for d, size in sizes.items() if fetched[d]),
            bytes_reused=sum(size for d, size in sizes.items() if not fetched[d]),
            blobs_fetched=sum(1 for d in sizes if fetched[d]),
            blobs_reused=sum(1 for d in sizes if not fetched[d]),
        )

    def _fetch_all(self, jobs: dict[Digest, tuple[_Resolved, Descriptor]]) -> dict[Digest, str]:
        cancel = threading.Event()
        results: dict[Digest, str] = {}
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="imc-pull") as pool:
            # Largest first: the biggest layer is the critical path, so it must not
            # start last behind a queue of small ones.
            order = sorted(jobs.items(), key=lambda job: job[1][1].size, reverse=True)
            futures: dict[Future, Digest] = {
                pool.submit(self._fetch_one, image, desc, cancel): digest for digest, (image, desc) in order
            }
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                cancel.set()
                for f in pending:
                    f.cancel()
                wait(pending)
                raise failed.exception()  # type: ignore[misc]
            for f, digest in futures.items():
                results[digest] = f.result()
        return results

    def _fetch_one(self, image: _Resolved, desc: Descriptor, cancel: threading.Event) -> str:
        name = str(image.reference)
        origin = STORE

        def on_bytes(n: int) -> None:
            if cancel.is_set():
                raise _Cancelled()
            self._emit(BlobProgress(name, desc.digest, desc.size, desc.media_type, delta=n))

        def download(sink: BlobSink) -> None:
            nonlocal origin
            for source in self.sources:
                stream = source.open_blob(desc.digest)
                if stream is not None:
                    origin = source.name
                    sink.reset()
                    with stream:
                        while sink.receive(stream.readinto):
                            pass
                    return
            origin = REGISTRY
            self._emit(BlobStarted(name, desc.digest, desc.size, desc.media_type, offset=sink.offset))
            image.registry.fetch_blob(image.reference.repository, desc.digest, desc.size, sink, on_bytes)

        if cancel.is_set():
            raise _Cancelled()
        self.store.ensure_blob(desc.digest, desc.size, download)
        self._emit(BlobDone(name, desc.digest, desc.size, desc.media_type, origin=origin))
        return origin
