"""The read-only OCI distribution endpoint that serves pulls from caches.

Every name and digest in a URL is validated against the distribution spec's grammar
before anything is looked up, so nothing from a request ever becomes a path. What
can be served comes from the ``ServeIndex``: the Ready caches' volumes (or their
flash staging copy in the store), the images pulled into the store, and the blobs
pull-through fetched on their own. A hit sends nothing upstream; a miss is a spec
404, or, with pull-through, a pull into the store that is then served like any other
stored image.

Pull-through connects only to the upstreams the operator listed: ``?ns=`` (what a
containerd mirror sends) must name one of them exactly, host and port, or the request
is answered at once without a connection. Concurrent misses for the same image or
blob share one upstream fetch.

A tag pull-through resolved is asked of its upstream again on each request (a cache,
a snapshot, never is), and each answer is recorded (``Caches.record_resolution``).
When the upstream cannot answer (unreachable, timed out, 5xx, or 404 for a tag it
served before), the last digest recorded for the tag is served from the store, stale,
unless the endpoint passes errors through; offline it never asks. After a connection
failure an upstream is left alone for a while (``UpstreamState``), and whatever is
not local is answered 503 ``UNAVAILABLE`` at once.

The handler is transport-free: it returns a ``Reply`` whose body is bytes, a file
extent (which the HTTP layer sends with ``sendfile``), or an iterator of chunks, and
whose ``outcome`` says what answering did (hit or miss, bytes served, bytes fetched
upstream) for the caller to count.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from builder import reference
from builder.caches import Caches, TagResolution
from builder.digest import Digest
from builder.errors import (
    BadReferenceError,
    ConnectError,
    DeadlineError,
    ImcError,
    NotFoundError,
    RegistryError,
    TransportError,
    ValidationError,
)
from builder.imagecache import READY, UPDATE_FAILED, UPDATING, ImageCache, Settings, parse_time
from builder.matcher import Entry, MatchRequest, rank
from builder.oci import INDEX_TYPES, MANIFEST_TYPES, Index
from builder.pull import Puller
from builder.reference import Reference
from builder.registry.auth import Keychain
from builder.registry.hosts import HostPolicy
from builder.registry.retry import RetryPolicy
from builder.server.hits import Hits
from builder.server.upstream import UpstreamState
from builder.store import Store
from builder.volume import Volume

SERVING_PHASES = (READY, UPDATING, UPDATE_FAILED)
_RANGE_RE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")
_PATH_RE = re.compile(r"^/v2/(.+)/(manifests|blobs|tags)/([^/]+)$")
INDEX_TTL = 2.0
FORCED_REFRESH_GAP = 0.25
PULL_THROUGH_ATTEMPTS = 3
PULL_THROUGH_TIMEOUT = (3.0, 60.0)
"""Pull-through answers a waiting client: a few seconds to connect, and few attempts."""
PULLED_TOUCH_EVERY = 3600.0
"""Seconds between records of a pulled-through blob's use (each is a file write)."""
RESOLUTION_RECORD_EVERY = 60.0
"""Seconds between records of an unchanged tag resolution (each is a write)."""

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """What answering one manifest or blob request did, for the metrics.

    ``hit``: answered from content already here, by ``cache`` (None: the store's own
    images); False is a miss (answered 404, or fetched upstream first); None is
    neither (a malformed request). ``served`` is the body bytes sent (None: no body,
    as for a HEAD of a blob), labelled with ``served_cache``, the cache a tag resolved
    through. ``upstream_bytes`` is what pull-through fetched to answer it. ``stale``
    says why a tag was answered with its last resolution, the upstream unable to
    answer (``unreachable``, ``timeout``, ``server_error``, ``not_found``); else None.
    """

    kind: str
    hit: bool | None = None
    cache: str | None = None
    served: int | None = None
    served_cache: str | None = None
    upstream_bytes: int = 0
    stale: str | None = None


@dataclass
class Reply:
    """An HTTP answer: status, headers, one kind of body, and what answering did."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    extent: tuple[Path, int, int] | None = None  # file, offset, length: sent with sendfile
    stream: Iterator[bytes] | None = None
    outcome: Outcome | None = None


@dataclass
class _Work:
    """What one request has done so far: filled in as it is answered, then its Outcome."""

    cache: str | None = None
    served: int | None = None
    served_cache: str | None = None
    upstream: bool = False
    upstream_bytes: int = 0
    refused: bool = False  # pull-through was asked of a registry that is not a listed upstream
    unavailable: UpstreamState | None = None  # the upstream could not answer for content not held
    stale: str | None = None

    def outcome(self, kind: str, status: int) -> Outcome:
        hit = None
        if status in (200, 206) and not self.upstream:
            hit = True
        elif status in (404, 503) or self.upstream:
            hit = False
        return Outcome(kind, hit, self.cache if hit else None, self.served, self.served_cache, self.upstream_bytes,
                       self.stale if status == 200 else None)


def error(status: int, code: str, message: str, detail: object = None) -> Reply:
    """A spec error body: ``{"errors": [{"code", "message", "detail"}]}``."""
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]}).encode()
    return Reply(status, {"Content-Type": "application/json"}, body)


@dataclass(frozen=True)
class Blob:
    """Where one servable blob's bytes are: a volume entry or a store file; ``cache``
    is the cache serving it (None for the store's own images and pulled blobs)."""

    size: int
    media_type: str
    volume: Volume | None = None
    path: Path | None = None
    cache: str | None = None
    pulled: bool = False  # fetched by pull-through on its own: kept by gc while it is used
    shared: bool = False  # held by other caches too (``cache`` is the first): a hit counts for none

    def extent(self, digest: Digest, start: int, end: int) -> tuple[Path, int, int] | None:
        """A file extent for sendfile, when the bytes lie in a file as they are."""
        if self.path is not None:
            return self.path, start, end - start
        assert self.volume is not None
        raw = self.volume.raw_extent(digest)
        return (self.volume.path, raw[0] + start, end - start) if raw else None

    def chunks(self, digest: Digest, start: int, end: int) -> Iterator[bytes]:
        assert self.volume is not None
        return self.volume.read_range(digest, start, end)


@dataclass(frozen=True)
class Tagged:
    """A tag a cache (or the store) can answer: the manifest or index it resolves to."""

    registry: str
    repository: str
    tag: str
    digest: Digest
    cache: ImageCache | None


class ServeIndex:
    """What can be served right now, rebuilt from the records when they may have changed.

    Rebuilt at most every ``INDEX_TTL`` seconds, and on a miss when the records
    changed since (their revision: one small read) or at most every
    ``FORCED_REFRESH_GAP``, so a cache that just became Ready is served at once and
    without a restart, while neither a busy server nor a flood of misses rereads every
    record on every request.
    """

    def __init__(self, caches: Caches) -> None:
        self.caches = caches
        self.store = caches.store
        self._lock = threading.Lock()
        self._built = 0.0
        self._revision: int | None = None
        self._volumes: dict[Path, Volume] = {}
        self.tags: list[Tagged] = []
        self.blobs: dict[Digest, Blob] = {}
        self.caches_by_name: dict[str, ImageCache] = {}
        self._next_expiry: dt.datetime | None = None

    def refresh(self, force: bool = False, miss: bool = False) -> None:
        """Rebuild if older than ``INDEX_TTL``; on a ``miss``, if a record changed since
        or if older than ``FORCED_REFRESH_GAP`` (a burst of misses for what nobody holds
        rebuilds once, not once per request); with ``force``, always (after this server
        pulled something itself); and as soon as a served cache has expired (the
        rebuild reads it, and so deletes it)."""
        with self._lock:
            age = time.monotonic() - self._built
            expiring = self._next_expiry is not None and self.caches.clock() >= self._next_expiry
            revision = None
            if not force and not expiring:
                if not miss and age < INDEX_TTL:
                    return
                revision = self.caches.revision()  # read first: a write after it is seen next time
                if miss and age < FORCED_REFRESH_GAP and revision == self._revision:
                    return
            self._revision = revision if revision is not None else self.caches.revision()
            tags: list[Tagged] = []
            blobs: dict[Digest, Blob] = {}
            volumes: dict[Path, Volume] = {}
            serving = [c for c in self.caches.list() if c.phase in SERVING_PHASES and c.source]
            for cache in serving:
                for image in cache.images:
                    ref = reference.parse(image.name)
                    top = Digest.parse(image.index or image.digest)
                    tags.append(Tagged(ref.registry, ref.repository, ref.tag or "", top, cache))
                if cache.source == "volume" and cache.volume:
                    path = Path(cache.volume.path)
                    vol = self._volumes.get(path) or _open_volume(path)
                    if vol is None:
                        continue
                    volumes[path] = vol
                    for digest, entry in vol.entries.items():
                        if _held_elsewhere(blobs, digest, cache.name):
                            continue
                        blobs[digest] = Blob(entry.size, entry.media_type, volume=vol, cache=cache.name)
                else:
                    self._add_store_closure(blobs, [Digest.parse(i.digest) for i in cache.images]
                                            + [Digest.parse(i.index) for i in cache.images if i.index], cache.name)
            for stored in self.store.images():
                ref = reference.parse(stored.name)
                top = stored.index_digest or stored.descriptor.digest
                tags.append(Tagged(ref.registry, ref.repository, ref.tag or "", top, None))
                self._add_store_closure(blobs, [stored.descriptor.digest, *([top] if stored.index_digest else [])])
            for digest in self.store.pulled():
                if digest not in blobs:
                    blobs[digest] = Blob(self.store.size(digest), "", path=self.store.blob_path(digest), pulled=True)
            self.tags, self.blobs, self._volumes = tags, blobs, volumes
            self.caches_by_name = {c.name: c for c in serving}
            expiries = [e for e in (self.caches.expiry(c) for c in serving) if e is not None]
            self._next_expiry = min(expiries, default=None)  # never served a moment past it
            self._built = time.monotonic()

    def _add_store_closure(self, blobs: dict[Digest, Blob], roots: list[Digest], cache: str | None = None) -> None:
        for root in roots:
            media_types = _media_types(self.store, root)
            for digest in self.store.closure(root):
                if not _held_elsewhere(blobs, digest, cache) and self.store.has(digest):
                    blobs[digest] = Blob(self.store.size(digest), media_types.get(digest, ""),
                                         path=self.store.blob_path(digest), cache=cache)

    def lookup_tag(self, registry: str | None, repository: str, tag: str) -> Tagged | None:
        """The best answer for a tag: among caches holding it, the matcher's ranking
        (most of the request held, size, newest); the store's images after caches."""
        found = [t for t in self.tags if t.repository == repository and t.tag == tag
                 and (registry is None or t.registry == registry)]
        if not found:
            return None
        in_caches = {t.cache.name: t for t in found if t.cache is not None}
        if in_caches:
            request = MatchRequest((f"{found[0].registry}/{repository}:{tag}",))
            ranked = rank([Entry.of(t.cache) for t in in_caches.values() if t.cache], request)
            if ranked:
                return in_caches[ranked[0].entry.name]
            return next(iter(in_caches.values()))
        return found[0]


def _held_elsewhere(blobs: dict[Digest, Blob], digest: Digest, cache: str | None) -> bool:
    """Whether ``blobs`` already serves ``digest``; if from another cache than ``cache``,
    it is marked ``shared``: a hit on it says no one cache is in use."""
    held = blobs.get(digest)
    if held is None:
        return False
    if cache is not None and held.cache not in (None, cache) and not held.shared:
        blobs[digest] = dataclasses.replace(held, shared=True)
    return True


def _gone(blob: Blob) -> bool:
    """A store blob that gc removed since the index was built (a miss, not an error)."""
    return blob.path is not None and not blob.path.exists()


def _open_volume(path: Path) -> Volume | None:
    try:
        return Volume.open(path)
    except ImcError:
        return None


def _media_types(store: Store, root: Digest) -> dict[Digest, str]:
    """Media types of the blobs under a stored manifest or index, from the manifests."""
    out: dict[Digest, str] = {}
    try:
        node = store.manifest(root)
    except (ImcError, ValueError):
        return out
    out[root] = node.media_type
    if isinstance(node, Index):
        for child in node.manifests:
            out[child.digest] = child.media_type
            if store.has(child.digest):
                out.update(_media_types(store, child.digest))
    else:
        for blob in node.blobs():
            out[blob.digest] = blob.media_type
    return out


class RegistryEndpoint:
    """Answers distribution API requests from the ServeIndex; writes only what
    pull-through fetched from a listed upstream, into the store.

    ``stale_if_error``: a pull-through tag the upstream cannot answer for is served as
    last resolved (else the error is passed on). ``offline``: no upstream is ever
    contacted (give no ``pull_through``); the tags pull-through recorded are served.
    ``clock`` times the upstreams' down windows.
    """

    def __init__(self, caches: Caches, pull_through: Puller | None = None, upstreams: Iterable[str] = (),
                 hits: Hits | None = None, stale_if_error: bool = True, offline: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = ServeIndex(caches)
        self.hits = hits
        self.caches = caches
        self.pull_through = pull_through
        self.upstreams = tuple(dict.fromkeys(u.lower() for u in upstreams))
        if pull_through is not None and not self.upstreams:
            raise ValidationError("--pull-through needs --upstream HOST[:PORT]: the registries it may pull from")
        if offline and pull_through is not None:
            raise ValidationError("offline: no pull-through puller may be given")
        self.stale_if_error = stale_if_error
        self.offline = offline
        self._states = {u: UpstreamState(clock) for u in self.upstreams}
        self._recorded: dict[tuple[str, str, str], tuple[Digest, float]] = {}
        self._touched: dict[Digest, float] = {}
        self._images: _Flights[int | ImcError] = _Flights()
        self._resolving: _Flights[_Resolved | ImcError] = _Flights()
        self._blobs: _Flights[Blob | ImcError | None] = _Flights()

    def upstream_state(self, registry: str) -> UpstreamState:
        """The reachability of a listed upstream."""
        return self._states[registry.lower()]

    def handle(self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> Reply:
        if method not in ("GET", "HEAD"):
            return error(405, "UNSUPPORTED", "this registry is read-only")
        if path in ("/v2", "/v2/"):
            return Reply(200, {"Content-Type": "application/json"}, b"{}")
        m = _PATH_RE.match(path)
        if not m:
            return error(404, "NOT_FOUND", "unknown route")
        name, kind, ident = m.groups()
        if not reference.valid_repository(name):
            return error(400, "NAME_INVALID", "invalid repository name", {"name": name[:256]})
        ns = query.get("ns")
        if ns is not None and not _valid_registry(ns):
            return error(400, "NAME_INVALID", "invalid ns (registry) parameter")
        if kind == "tags":
            return self._tags(name, ns) if ident == "list" else error(404, "NOT_FOUND", "unknown route")
        work = _Work()
        if kind == "manifests":
            reply = self._manifest(method, name, ident, ns, headers, work)
        else:
            reply = self._blob(method, name, ident, ns, headers, work)
        if reply.status == 404 and work.refused:
            # One answer for every registry that is not listed: nothing about whether it exists.
            reply = error(404, "NAME_UNKNOWN", "not held here, and its registry is not an upstream of this server",
                          {"name": name})
        elif reply.status == 404 and work.unavailable is not None:
            reply = _unavailable(work.unavailable)
        reply.outcome = work.outcome(kind[:-1], reply.status)
        return reply

    # -- manifests -------------------------------------------------------------------

    def _manifest(self, method: str, name: str, ident: str, ns: str | None, headers: Mapping[str, str],
                  work: _Work) -> Reply:
        if ident.startswith(("sha256:", "sha512:")):
            try:
                digest = Digest.parse(ident)
            except BadReferenceError:
                return error(400, "DIGEST_INVALID", "invalid digest")
            tagged = None
        else:
            if not reference.TAG_RE.match(ident):
                return error(400, "TAG_INVALID", "invalid tag")
            tagged = self._find_tag(name, ident, ns, work)
            if tagged is None:
                return error(404, "MANIFEST_UNKNOWN", "manifest unknown", {"name": name, "tag": ident})
            if isinstance(tagged, Reply):
                return tagged
            digest = tagged.digest
        blob = self._find_blob(digest)
        if blob is None and tagged is None and self._pull(name, str(digest), ns, work):
            blob = self._find_blob(digest)
        if blob is None or blob.media_type not in (*MANIFEST_TYPES, *INDEX_TYPES):
            return error(404, "MANIFEST_UNKNOWN", "manifest unknown", {"name": name, "digest": str(digest)})
        accept = headers.get("Accept", "")
        if accept and blob.media_type not in accept and "*/*" not in accept and not _accepts_any(accept):
            return error(404, "MANIFEST_UNKNOWN", f"manifest is {blob.media_type}, not in Accept")
        cache_name = tagged.cache.name if tagged and tagged.cache else None
        work.cache = cache_name or blob.cache
        self._mark_used(work.cache)
        data = self._read(digest, blob)
        work.served, work.served_cache = len(data), cache_name
        head = {"Content-Type": blob.media_type, "Docker-Content-Digest": str(digest),
                "Content-Length": str(len(data))}
        return Reply(200, head, b"" if method == "HEAD" else data)

    def _find_tag(self, name: str, tag: str, ns: str | None, work: _Work) -> Tagged | Reply | None:
        """What a tag names: a cache's answer as it is (a snapshot); offline, what is
        held (the store's images, the tags pull-through recorded); with pull-through,
        the upstream's answer for a tag it resolved before or one not held (or the last
        resolution, stale, when the upstream cannot answer); else the store's image."""
        self.index.refresh()
        found = self.index.lookup_tag(ns, name, tag)
        if found is None:
            self.index.refresh(miss=True)
            found = self.index.lookup_tag(ns, name, tag)
        if found is not None and found.cache is not None:
            return found
        if self.offline:
            return found or self._held_resolution(self.caches.resolution(ns, name, tag))
        listed = self._listed(ns)
        if listed is None:
            if found is None:
                self._registry_for(ns, work)  # marks an unlisted ns refused
            return found
        recorded = self.caches.resolution(listed, name, tag)
        if found is not None and recorded is None:
            return found  # imc pull put it in the store: it is served as it is
        return self._through(listed, name, tag, recorded, work)

    def _held_resolution(self, recorded: TagResolution | None) -> Tagged | None:
        """A recorded resolution whose content is all in the store, as a tag to serve."""
        if recorded is None:
            return None
        digest = Digest.parse(recorded.digest)
        store = self.caches.store
        if not all(store.has(d) for d in store.closure(digest)):
            return None
        return Tagged(recorded.registry, recorded.repository, recorded.tag, digest, None)

    def _through(self, registry: str, name: str, tag: str, recorded: TagResolution | None,
                 work: _Work) -> Tagged | Reply | None:
        """Ask ``registry`` what the tag names now and fetch what is new; if it cannot
        answer, serve the last resolution when allowed (and held), else its error."""
        held = self._held_resolution(recorded)
        stale = held if self.stale_if_error else None
        state = self._states[registry]
        if not state.admit():
            if stale is not None and recorded is not None:
                return self._stale(recorded, stale, f"upstream down ({state.reason}), next try in "
                                   f"{math.ceil(state.retry_after())} s", "unreachable", work)
            return _unavailable(state)
        try:
            ref = reference.parse(f"{registry}/{name}:{tag}")
        except BadReferenceError:
            state.reached()  # no contact made: the probe ends here
            return None

        once = state.down or stale is not None  # a probe, or a client the held content answers

        def resolve() -> _Resolved | ImcError:
            try:
                return self._resolve(ref, held, once)
            except ImcError as e:
                return e

        result, led = self._resolving.run((registry, name, tag), resolve)
        _report(state, result)
        if isinstance(result, ImcError):
            reason = _stale_reason(result, recorded is not None)
            if reason is not None and stale is not None and recorded is not None:
                return self._stale(recorded, stale, result.message, reason, work)
            if reason is not None and reason != "not_found":
                work.unavailable = state
                log.warning("pull-through of %s failed: %s", ref, result.message)
            return None
        if result.pulled:
            work.upstream = True
            if led:
                work.upstream_bytes += result.fetched
        key = (registry, name, tag)
        now = time.monotonic()
        last = self._recorded.get(key)
        if last is None or last[0] != result.digest or now - last[1] >= RESOLUTION_RECORD_EVERY:
            self.caches.record_resolution(registry, name, tag, result.digest, result.media_type)
            self._recorded[key] = (result.digest, now)
        return Tagged(registry, name, tag, result.digest, None)

    def _resolve(self, ref: Reference, held: Tagged | None, once: bool) -> _Resolved:
        """What ``ref`` names upstream now: the ``held`` content if the tag still names
        it, else pulled into the store. ``once``: one try (a probe of a down upstream,
        or a client that the held content answers if the upstream does not)."""
        assert self.pull_through is not None and ref.tag is not None
        store = self.caches.store
        puller = self._bounded(self.pull_through, once=once)
        # Asked with a HEAD: registries that limit pulls (Docker Hub) count manifest GETs only.
        if held is not None and puller.registry(ref.api_host).current_digest(ref.repository, ref.tag) == held.digest:
            return _Resolved(held.digest, store.manifest(held.digest).media_type, False, 0)
        result = puller.pull([ref])
        image = result.images[0]
        top = image.index_digest or image.descriptor.digest
        self.index.refresh(force=True)
        return _Resolved(top, store.manifest(top).media_type, True, result.bytes_fetched)

    def _stale(self, recorded: TagResolution, held: Tagged, why: str, reason: str, work: _Work) -> Tagged:
        """Answer a tag with its last resolution because the upstream could not: logged, counted."""
        resolved = parse_time(recorded.resolved)
        age = _age(self.caches.clock() - resolved) if resolved else "an unknown time"
        log.warning("serving %s/%s:%s stale as %s, resolved %s ago: %s", recorded.registry, recorded.repository,
                    recorded.tag, recorded.digest, age, why)
        work.stale = reason
        return held


    # -- blobs -----------------------------------------------------------------------

    def _blob(self, method: str, name: str, ident: str, ns: str | None, headers: Mapping[str, str],
              work: _Work) -> Reply:
        try:
            digest = Digest.parse(ident)
        except BadReferenceError:
            return error(400, "DIGEST_INVALID", "invalid digest")
        blob = self._find_blob(digest)
        if blob is None and self.pull_through is not None:
            blob = self._pull_blob(name, digest, ns, work)
        if blob is None:
            return error(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": str(digest)})
        work.cache = blob.cache
        if blob.pulled:
            self._touch_pulled(digest)
        start, end = 0, blob.size
        status = 200
        head = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": str(digest),
                "Accept-Ranges": "bytes"}
        if "Range" in headers:
            parsed = _parse_range(headers["Range"], blob.size)
            if parsed is None:
                return Reply(416, {"Content-Range": f"bytes */{blob.size}", "Content-Length": "0"})
            start, end = parsed
            status = 206
            head["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        head["Content-Length"] = str(end - start)
        self._mark_used(None if blob.shared else blob.cache)
        if method == "HEAD":
            return Reply(status, head)
        work.served = end - start
        extent = blob.extent(digest, start, end)
        if extent is not None:
            return Reply(status, head, extent=extent)
        return Reply(status, head, stream=blob.chunks(digest, start, end))

    def _find_blob(self, digest: Digest) -> Blob | None:
        self.index.refresh()
        blob = self.index.blobs.get(digest)
        if blob is None or _gone(blob):
            self.index.refresh(miss=True)
            blob = self.index.blobs.get(digest)
        return None if blob is None or _gone(blob) else blob

    def _read(self, digest: Digest, blob: Blob) -> bytes:
        if blob.path is not None:
            return self.caches.store.read_blob(digest)  # never through a link swapped in since
        assert blob.volume is not None
        return blob.volume.read_bytes(digest)

    # -- pull-through and bookkeeping ---------------------------------------------------

    def _listed(self, ns: str | None) -> str | None:
        """The upstream a request maps to (``ns``, or the first listed), if pull-through may use it."""
        if self.pull_through is None:
            return None
        if ns is None:
            return self.upstreams[0]
        return ns.lower() if ns.lower() in self.upstreams else None

    def _registry_for(self, ns: str | None, work: _Work) -> str | None:
        """The upstream to pull a miss from: ``ns`` if it is a listed upstream, else
        (no ``ns``) the first listed one; None when there is no pull-through, or when
        ``ns`` names any other registry (marked refused: no connection is made)."""
        if self.pull_through is None:
            return None
        if ns is None:
            return self.upstreams[0]
        if ns.lower() in self.upstreams:
            return ns.lower()
        work.refused = True
        return None

    def _pull(self, name: str, digest: str, ns: str | None, work: _Work) -> bool:
        """Pull a missed manifest (by digest) into the store; True if it is now there.
        Concurrent misses for the same one wait for one pull."""
        registry = self._registry_for(ns, work)
        if registry is None or self.pull_through is None:
            return False
        try:
            ref = reference.parse(f"{registry}/{name}@{digest}")
        except BadReferenceError:
            return False
        puller = self.pull_through
        state = self._states[registry]
        work.upstream = True
        if not state.admit():
            work.unavailable = state
            return False
        probe = state.down

        def pull() -> int | ImcError:
            try:
                fetched = self._bounded(puller, once=probe).pull([ref]).bytes_fetched
            except ImcError as e:
                return e
            self.index.refresh(force=True)
            return fetched

        fetched, led = self._images.run((registry, name, digest), pull)
        _report(state, fetched)
        if isinstance(fetched, ImcError):
            if _stale_reason(fetched, False) is not None:
                work.unavailable = state
            return False
        if led:
            work.upstream_bytes += fetched
        return True

    def _pull_blob(self, name: str, digest: Digest, ns: str | None, work: _Work) -> Blob | None:
        """A blob miss with pull-through: fetch that blob alone into the store, and
        record it so that it is served from there from now on. Concurrent misses for
        the same blob wait for one fetch."""
        registry = self._registry_for(ns, work)
        if registry is None or self.pull_through is None:
            return None
        puller = self.pull_through
        store = self.caches.store
        state = self._states[registry]
        work.upstream = True
        if not state.admit():
            work.unavailable = state
            return None
        probe = state.down
        fetched = 0

        def fetch() -> Blob | ImcError | None:
            nonlocal fetched
            try:
                client = self._bounded(puller, once=probe).registry(reference.parse(f"{registry}/{name}").api_host)
                with store.pinning():
                    size = client.blob_size(name, digest)
                    if store.ensure_blob(digest, size, lambda sink: client.fetch_blob(name, digest, size, sink)):
                        fetched = size
                    store.record_pulled(digest)
            except ImcError as e:
                return e
            self.index.refresh(force=True)
            return self.index.blobs.get(digest) or Blob(store.size(digest), "", path=store.blob_path(digest),
                                                         pulled=True)

        blob, led = self._blobs.run(digest, fetch)
        _report(state, blob)
        if isinstance(blob, ImcError):
            if _stale_reason(blob, False) is not None:
                work.unavailable = state
            return None
        if led:
            work.upstream_bytes += fetched
        return blob

    def _bounded(self, puller: Puller, once: bool = False) -> Puller:
        """The puller under this pull-through's bounds, its deadline counted from now, so
        that a stalled upstream holds a server thread no longer than the settings allow.
        ``once``: a single try, for a probe of a down upstream (which tells whether it is
        back) and for a tag whose held content answers the client if the upstream does not."""
        retry = pull_through_retry(self.caches.settings)
        return puller.with_retry(dataclasses.replace(retry, attempts=1) if once else retry)

    def upstream_waiters(self) -> int:
        """Requests waiting right now for a pull-through another request started."""
        return self._images.waiting + self._resolving.waiting + self._blobs.waiting

    def _touch_pulled(self, digest: Digest) -> None:
        """Record a use of a pulled-through blob, at most once an hour (it is a write)."""
        now = time.monotonic()
        if now - self._touched.get(digest, -1e9) < PULLED_TOUCH_EVERY:
            return
        self._touched[digest] = now
        try:
            self.caches.store.record_pulled(digest)
        except ImcError:
            pass

    def _mark_used(self, cache: str | None) -> None:
        """Count a hit on a cache (``Hits`` writes them in batches): every manifest it
        answers, and every blob that no other cache holds (a layer several caches share
        says nothing of which one is in use; the pull's manifest does)."""
        if cache is not None and self.hits is not None:
            self.hits.hit(cache)

    def _tags(self, name: str, ns: str | None) -> Reply:
        self.index.refresh()
        tags = sorted({t.tag for t in self.index.tags if t.repository == name and t.tag
                       and (ns is None or t.registry == ns)})
        if not tags:
            return error(404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name})
        return Reply(200, {"Content-Type": "application/json"}, json.dumps({"name": name, "tags": tags}).encode())


@dataclass(frozen=True)
class _Resolved:
    """What an upstream named for a tag: the digest and media type of its manifest or
    index, whether it had to be pulled, and the bytes that pull fetched."""

    digest: Digest
    media_type: str
    pulled: bool
    fetched: int


def _stale_reason(e: ImcError, served_before: bool) -> str | None:
    """Why an upstream failure lets a tag be served stale (the metric's label), or None
    when the upstream answered and meant it: a refusal, bad content, a local failure.
    A 404 counts only for a tag the upstream served before."""
    if isinstance(e, NotFoundError):
        return "not_found" if served_before else None
    if isinstance(e, ConnectError):
        return "unreachable"
    if isinstance(e, DeadlineError) or (isinstance(e, TransportError) and e.temporary):
        return "timeout"
    if isinstance(e, RegistryError) and e.status is not None and e.status >= 500:
        return "server_error"
    return None


def _report(state: UpstreamState, outcome: object) -> None:
    """Tell ``state`` whether the upstream could be reached, from what contacting it gave."""
    if isinstance(outcome, ConnectError):
        state.unreachable(outcome.message)
    else:
        state.reached()


def _unavailable(state: UpstreamState) -> Reply:
    """The answer for content not held while its upstream cannot answer: 503
    ``UNAVAILABLE``, and when the upstream is down, when it will be tried again."""
    reply = error(503, "UNAVAILABLE", "not held here, and the upstream registry cannot be reached"
                  if state.down else "not held here, and the upstream registry could not answer",
                  {"reason": state.reason} if state.down else None)
    if state.down:
        reply.headers["Retry-After"] = str(max(1, math.ceil(state.retry_after())))
    return reply


def _age(delta: dt.timedelta) -> str:
    """``3d4h``, ``2h5m``, ``4m10s``, ``12s``: how long ago, to the two largest units."""
    seconds = max(int(delta.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class _Flights(Generic[T]):
    """At most one piece of upstream work per key at a time: a request that finds the
    same work running waits for it and shares its result (or its exception)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, Future[T]] = {}
        self.waiting = 0  # requests waiting for another's work, right now

    def run(self, key: Hashable, work: Callable[[], T]) -> tuple[T, bool]:
        """The work's result, and whether this call did it (False: it waited for another)."""
        with self._lock:
            flight = self._running.get(key)
            leader = flight is None
            if flight is None:
                flight = self._running[key] = Future()
            else:
                self.waiting += 1
        if not leader:
            try:
                return flight.result(), False
            finally:
                with self._lock:
                    self.waiting -= 1
        try:
            result = work()
        except BaseException as e:
            flight.set_exception(e)
            raise
        else:
            flight.set_result(result)
            return result, True
        finally:
            with self._lock:
                del self._running[key]


def pull_through_retry(settings: Settings) -> RetryPolicy:
    """How one pull-through may wait: the settings' stall limit and overall deadline
    (``pull_timeout_seconds``, counted from now), a short connect timeout and few
    attempts, since a client is waiting for the answer."""
    return dataclasses.replace(settings.retry_policy(), attempts=PULL_THROUGH_ATTEMPTS, timeout=PULL_THROUGH_TIMEOUT)


def pull_through_puller(store: Store, policy: HostPolicy, keychain: Keychain) -> Puller:
    """The puller ``imc serve --pull-through`` uses: since any client may trigger it,
    no redirect from a public upstream into the local network. Each pull-through runs
    it under ``pull_through_retry`` (``Puller.with_retry``)."""
    return Puller(store, dataclasses.replace(policy, internal_redirects=False), keychain,
                  retry=pull_through_retry(Settings()))


def _valid_registry(text: str) -> bool:
    try:
        return reference.parse(f"{text}/x").registry == text
    except BadReferenceError:
        return False


def _accepts_any(accept: str) -> bool:
    return not any(t.strip().split(";")[0] in (*MANIFEST_TYPES, *INDEX_TYPES) for t in accept.split(","))


def _position(digits: str) -> int:
    """A byte position from a Range header; past 18 digits (beyond any blob) it is read
    as 10**18, since int() refuses more than 4300 digits and a huge one gains nothing."""
    return int(digits) if len(digits) <= 18 else 10 ** 18


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """A single ``bytes=a-b`` range as [start, end); None if unsatisfiable or malformed."""
    m = _RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        start = _position(m.group(1))
        end = min(_position(m.group(2)) + 1, size) if m.group(2) else size
    else:
        start, end = max(size - _position(m.group(2)), 0), size
    if start >= size or start >= end:
        return None
    return start, end

