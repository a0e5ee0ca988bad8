"""The Kubernetes-style ImageCache API, as a handler with no transport of its own.

An HTTP server routes every request under ``ImageCacheAPI.PREFIX`` to
``ImageCacheAPI.handle(method, path, headers, body)`` and writes back the
``Response``. Keeping HTTP out of this module means every answer, including every
refusal, can be tested by calling one method, and the server stays a thin shell.

The answers follow the Kubernetes API conventions, so ``kubectl``-minded users and
clients meet what they expect:

    POST   PREFIX          create (YAML or JSON body)   201 ImageCache
    GET    PREFIX          list                         200 ImageCacheList (a Table if asked)
    GET    PREFIX?watch=1  watch                        200 watch events, one JSON line each
    GET    PREFIX/{name}   read                         200 ImageCache
    PUT    PREFIX/{name}   replace the spec             200 ImageCache
    PATCH  PREFIX/{name}   merge, JSON or apply patch   200 ImageCache
    DELETE PREFIX/{name}   delete                       200 Status (Success)

with discovery, the version and the OpenAPI schema beside them (builder.server.discovery),
and every error is a ``Status`` object with ``status: Failure``, a ``reason`` and the
HTTP ``code``. A refused request changes nothing: a body is parsed and validated in
full before ``Caches.create`` is called, and a name taken from the path is checked
against DNS-1123 before it is looked up anywhere.

Builds are slow (they pull images), so POST answers at once with the object in phase
Creating and hands the build to a ``BuildRunner``, a small bounded thread pool; the
record's status and progress then move as the build goes, and GET shows them.
"""

from __future__ import annotations

import copy
import hmac
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, Self
from urllib.parse import parse_qs, urlsplit

import yaml
from yaml.composer import ComposerError

from builder.build import Builder
from builder.caches import STALE, BuildLease, Caches
from builder.errors import (
    AlreadyExistsError,
    CacheDeletedError,
    CacheStateError,
    CapacityError,
    ImcError,
    NotFoundLocalError,
    QuotaError,
    ValidationError,
)
from builder.imagecache import (
    API_VERSION,
    AnnotationReport,
    CacheSpec,
    ImageCache,
    new_cache_id,
    now_utc,
    rfc3339,
    spec_from_object,
    validate_name,
)
from builder.plan import plan
from builder.server.discovery import GROUP, KIND, LIST_KIND, RESOURCE, documents, table, wants_table
from builder.server.patch import PatchError, json_patch, merge_patch, unknown_fields

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
"""The largest request body accepted; a server may stop reading beyond it."""
MAX_YAML_DEPTH = 64
"""An ImageCache object nests four levels deep; far deeper is an attack, not a cache."""
MAX_MESSAGE_CHARS = 1024
PLAN_TIMEOUT_SECONDS = 60
"""How long a dry run may spend resolving the images of its plan."""
"""Status messages quote the input they refuse; a huge field is not echoed back whole."""

JSON = "application/json"
YAML = "application/yaml"
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, APPLY_PATCH)
MAX_WATCHES = 32
"""Watches open at once; each holds a connection (a thread) for up to MAX_WATCH_SECONDS."""
MAX_WATCH_SECONDS = 1800
WATCH_POLL_SECONDS = 0.2
"""How often a watch reads the records' revision (one small query) for changes made by
any process: this server's builds, the CLI, detached builds."""


class RunnerClosedError(ImcError):
    """The build runner is shut down (the server is stopping): no new builds start."""


class BuildSubmitter(Protocol):
    """What the API needs from a build runner: take a build and its lease, return at once."""

    def submit(self, name: str, lease: BuildLease) -> None: ...


@dataclass
class Response:
    """One answer: HTTP status, body, its media type, and any extra headers
    (``Allow`` on a 405, as RFC 9110 requires)."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterable[bytes] | None = None
    """A watch: lines sent as they come, instead of ``body``."""


class ApiError(Exception):
    """A refusal on its way to becoming a Status object: HTTP code, reason, message."""

    def __init__(self, code: int, reason: str, message: str, name: str | None = None,
                 headers: dict[str, str] | None = None, kind: str = RESOURCE,
                 causes: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.name = name
        self.headers = headers or {}
        self.kind = kind
        self.causes = causes or []


# -- the build runner -------------------------------------------------------------------------


class BuildRunner:
    """Runs cache builds in background threads (a small bounded pool), so POST answers at once
    with the object in phase Creating and status/progress update as the build goes.

    ``submit`` takes ownership of the lease: the build releases it when it ends, and a
    build that never starts (refused, or cancelled by ``shutdown(wait=False)``) releases
    it at once, so the cache is not left looking built-by-someone forever.
    """

    def __init__(self, builder: Builder, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.builder = builder
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imc-build")
        self._lock = threading.RLock()  # RLock: a done callback may run inside submit
        self._leases: dict[Future[None], BuildLease] = {}
        self._closed = False

    def submit(self, name: str, lease: BuildLease) -> None:
        """Queue ``Builder.build(name, lease)``; raises RunnerClosedError after shutdown."""
        with self._lock:
            if self._closed:
                lease.release()
                raise RunnerClosedError("the build runner is shut down: no new builds are accepted")
            future = self._pool.submit(self._run, name, lease)
            self._leases[future] = lease
        future.add_done_callback(self._done)

    def _run(self, name: str, lease: BuildLease) -> None:
        try:
            self.builder.build(name, lease)
        except CacheDeletedError:
            pass  # deleted while it was building: nothing is left to report to
        except Exception:
            # Builder.build records build failures on the cache itself; anything that
            # escapes is a bug, logged here because no caller is waiting for it.
            log.exception("build of image cache %s ended with an unexpected error", name)
        finally:
            lease.release()  # idempotent; covers a build that raised before its own cleanup

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            lease = self._leases.pop(future, None)
        if future.cancelled() and lease is not None:
            lease.release()

    @property
    def pending(self) -> int:
        """Builds queued or running."""
        with self._lock:
            return len(self._leases)

    def shutdown(self, wait: bool = True) -> None:
        """Accept no more builds. ``wait``: finish every queued build first; otherwise
        cancel the queued ones (their caches then read as Failed) and return at once."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)


# -- the API ----------------------------------------------------------------------------------


class ImageCacheAPI:
    """The ImageCache resource over HTTP semantics, for any server to call."""

    PREFIX = f"/apis/{API_VERSION}/{RESOURCE}"
    DOCUMENTS = documents()

    @classmethod
    def owns(cls, path: str) -> bool:
        """Whether a request path is the API's (the resource, discovery, the schema,
        the version), not the registry's."""
        route = urlsplit(path).path.rstrip("/") or "/"
        return (route in cls.DOCUMENTS or route == "/openapi/v2" or route.startswith(cls.PREFIX)
                or route.startswith("/apis/") or route.startswith("/api/") or route.startswith("/openapi/"))

    def __init__(self, caches: Caches, builds: BuildSubmitter, token: str | None = None) -> None:
        self.caches = caches
        self.builds = builds
        self.token = token
        self._watch_lock = threading.Lock()
        self._watches = 0

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               peer: str | None = None) -> Response:
        """Answer one request from ``peer`` (the client's address; None: this process).
        Never raises: every failure is a Status object."""
        lowered = {str(k).lower(): str(v) for k, v in headers.items()}
        fmt = _negotiate(lowered.get("accept", ""))
        try:
            self._authenticate(lowered.get("authorization", ""), peer)
            answer = self._dispatch(method.upper(), path, lowered, body)
            if isinstance(answer, Response):
                return answer
            status, doc = answer
            warnings = doc.pop(WARNINGS, None) if isinstance(doc, dict) else None
            response = _render(status, doc, fmt)
            if warnings:
                response.headers["Warning"] = ", ".join(f'299 - {json.dumps(w)}' for w in warnings)
            return response
        except ApiError as e:
            return _render(e.code, _failure(e.code, e.reason, e.message, e.name, e.kind, e.causes), fmt, e.headers)
        except Exception:
            # Never leak a traceback or an internal message (paths, hosts) to a client.
            log.exception("%s %s failed unexpectedly", method, path)
            return _render(500, _failure(500, "InternalError", "an internal error occurred; see the server log"),
                           fmt)

    def _authenticate(self, authorization: str, peer: str | None) -> None:
        """With a token, every request must bear it; without one, only loopback clients
        are served (the API changes what this machine holds)."""
        if self.token is None:
            if peer is not None and not _loopback(peer):
                raise ApiError(401, "Unauthorized", "Unauthorized: the API answers other machines only with a "
                               "bearer token (imc serve --api-token-file)")
            return
        scheme, _, offered = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(offered.strip().encode(), self.token.encode()):
            raise ApiError(401, "Unauthorized", "Unauthorized", headers={"WWW-Authenticate": 'Bearer realm="imc"'})

    # -- routing --------------------------------------------------------------------------

    def _dispatch(self, method: str, path: str, headers: dict[str, str],
                  body: bytes) -> tuple[int, dict[str, Any]] | Response:
        parts = urlsplit(path)
        route = parts.path
        if route != self.PREFIX and route.endswith("/"):
            route = route[:-1]
        query = parse_qs(parts.query, keep_blank_values=True)
        document = self.DOCUMENTS.get(route.rstrip("/") or "/")
        if document is not None:
            if method not in ("GET", "HEAD"):
                raise _not_allowed(method, "GET", "a discovery document")
            return 200, document
        as_table = wants_table(headers.get("accept", ""))
        if route == self.PREFIX:
            if method == "GET" and _flag(query, "watch"):
                return self._watch(query, as_table)
            if method == "GET":
                listed = self._list(query)
                return 200, _as_table(listed["items"], query, listed["metadata"]) if as_table else listed
            if method == "POST":
                return 201, self._create(headers, body, query)
            raise _not_allowed(method, "GET, POST", "the collection")
        prefix = self.PREFIX + "/"
        if not route.startswith(prefix):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        raw_name = route[len(prefix):]
        if raw_name.endswith("/status") and raw_name.count("/") == 1:
            # The status subresource: imc writes status, clients only read it.
            if method != "GET":
                raise _not_allowed(method, "GET", "the status of an image cache")
            raw_name = raw_name[:-len("/status")]
        if "/" in raw_name:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if method not in ("GET", "PUT", "PATCH", "DELETE"):
            raise _not_allowed(method, "GET, PUT, PATCH, DELETE", "an image cache")
        name = _path_name(raw_name)
        if method == "GET":
            obj = self._get(name).to_object()
            return 200, _as_table([obj], query) if as_table else obj
        if method == "PUT":
            return 200, self._replace(name, _parse_body(headers, body), query)
        if method == "PATCH":
            return self._patch(name, headers, body, query)
        return 200, self._delete(name)

    # -- the verbs --------------------------------------------------------------------------

    def _list(self, query: dict[str, list[str]]) -> dict[str, Any]:
        wanted = _name_selector(query)
        revision = self.caches.revision()  # read first: a write after it is seen again by a watch
        items = [c.to_object() for c in self.caches.list() if wanted is None or c.name == wanted]
        return {"apiVersion": API_VERSION, "kind": LIST_KIND, "metadata": {"resourceVersion": str(revision)},
                "items": items}

    def _get(self, name: str) -> ImageCache:
        try:
            return self.caches.get(name)
        except NotFoundLocalError:
            raise _not_found(name) from None

    def _delete(self, name: str) -> dict[str, Any]:
        try:
            cache = self.caches.delete(name)
        except NotFoundLocalError:
            raise _not_found(name) from None
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": cache.name, "group": GROUP, "kind": RESOURCE, "uid": cache.uid}}

    def _create(self, headers: dict[str, str], body: bytes, query: dict[str, list[str]]) -> dict[str, Any]:
        dry_run = _dry_run(query)
        obj = _parse_body(headers, body)
        claimed = _claimed_name(obj)
        warnings = _check_fields(obj, query)
        try:
            name, spec, no_effect = spec_from_object(obj)
        except ValidationError as e:
            raise _invalid(claimed, e.message) from None
        if dry_run:
            would = self._would_create(name, spec, no_effect)
            plan_warnings = self._plan_into(would, name, spec, None)
            return {**would, **({WARNINGS: warnings + plan_warnings} if warnings or plan_warnings else {})}
        try:
            cache, lease = self.caches.create(name, spec, no_effect=no_effect)
        except AlreadyExistsError:
            raise _already_exists(name) from None
        except ValidationError as e:
            raise _invalid(name, e.message) from None
        except QuotaError as e:
            raise ApiError(403, "Forbidden", f"{RESOURCE}.{GROUP} {_quote(name)} is forbidden: {e.message}",
                           name) from None
        except CacheStateError as e:
            raise ApiError(409, "Conflict", f"operation cannot be fulfilled on {RESOURCE}.{GROUP} "
                           f"{_quote(name)}: {e.message}", name) from None
        try:
            self.builds.submit(name, lease)
        except RunnerClosedError as e:
            # No build will run: take the record back so the refusal leaves nothing behind.
            try:
                self.caches.delete(name)
            except NotFoundLocalError:
                pass
            raise ApiError(503, "ServiceUnavailable", e.message, name) from None
        return {**cache.to_object(), **({WARNINGS: warnings} if warnings else {})}

    def _would_create(self, name: str, spec: CacheSpec, no_effect: AnnotationReport) -> dict[str, Any]:
        """``dryRun=All``: the checks ``create`` makes, none of its writes."""
        if self.caches.exists(name):
            raise _already_exists(name)
        try:
            for secret in spec.image_pull_secrets:
                self.caches.secrets.load(secret)
        except ValidationError as e:
            raise _invalid(name, e.message) from None
        settings = self.caches.settings
        manual = self.caches.count(auto=False)
        if manual >= settings.max_manual_caches:
            raise ApiError(403, "Forbidden", f"{RESOURCE}.{GROUP} {_quote(name)} is forbidden: quota exceeded: "
                           f"{manual} manual image caches exist, the maximum is {settings.max_manual_caches}", name)
        now = rfc3339(now_utc())
        cache = ImageCache(name=name, id=new_cache_id(), spec=spec, created=now)  # type: ignore[arg-type]
        cache.expire = cache.retention_expiry()
        no_effect.record(cache)
        obj = cache.to_object()
        obj["status"]["phase"] = ""
        return obj

    def _plan_into(self, obj: dict[str, Any], name: str, spec: CacheSpec, own: ImageCache | None) -> list[str]:
        """``dryRun=All``: put what building ``spec`` would do in ``status.plan``; the
        warnings to send with it (it will not fit, or it could not be planned). A plan
        that fails does not refuse the object: the cache would be accepted, and its
        build would fail the same way."""
        try:
            planned = plan(self.caches, spec, own, timeout=PLAN_TIMEOUT_SECONDS)
        except ImcError as e:
            obj["status"]["plan"] = {"error": _clip(e.message)}
            return [_clip(f"image cache {name} could not be planned: {e.message}")]
        obj["status"]["plan"] = planned.to_json()
        return [] if planned.fits else [f"image cache {name}: {planned.verdict()}"]

    def _replace(self, name: str, obj: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
        """PUT (and every patch, once applied): the cache takes the object's spec, through
        ``Caches.update_spec``, which decides what a change does (a rebuild in the background,
        the old volume serving) or refuses it with nothing changed. A ``resourceVersion``
        in the object must be the current one: a stale one is a Conflict."""
        dry_run = _dry_run(query)
        warnings = _check_fields(obj, query)
        try:
            claimed, spec, _ = spec_from_object(obj)
        except ValidationError as e:
            raise _invalid(name, e.message) from None
        if claimed != name:
            raise ApiError(400, "BadRequest", f"the name in the object ({_quote(claimed)}) does not match the name "
                           f"in the path ({_quote(name)})", name)
        current = self._get(name)
        expected = (obj.get("metadata") or {}).get("resourceVersion")
        checked = expected not in (None, "")
        if checked and str(expected) != str(current.resource_version):
            raise _conflict(name, STALE)
        if dry_run:
            try:
                self.caches.plan_update(name, spec)
            except (ValidationError, CapacityError) as e:
                raise _invalid(name, e.message) from None
            except CacheStateError as e:
                raise _conflict(name, e.message) from None
            would = {**current.to_object(), "spec": obj.get("spec")}
            plan_warnings = self._plan_into(would, name, spec, current)
            return {**would, **({WARNINGS: warnings + plan_warnings} if warnings or plan_warnings else {})}
        try:
            cache, lease = self.caches.update_spec(name, spec,
                                                   resource_version=current.resource_version if checked else None)
        except NotFoundLocalError:
            raise _not_found(name) from None
        except (ValidationError, CapacityError) as e:
            raise _invalid(name, e.message) from None
        except CacheStateError as e:
            raise _conflict(name, e.message) from None
        if lease is not None:
            try:
                self.builds.submit(name, lease)
            except RunnerClosedError as e:
                # The lease is free again: the next reader marks the update failed, the
                # previous volume still serving.
                raise ApiError(503, "ServiceUnavailable", e.message, name) from None
        return {**cache.to_object(), **({WARNINGS: warnings} if warnings else {})}

    def _patch(self, name: str, headers: dict[str, str], body: bytes,
               query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """PATCH: a merge patch (kubectl apply, edit, patch --type merge), a JSON patch
        (patch --type json) or an apply patch (apply --server-side) over the current
        object, then the result as a PUT. Status in a patch is ignored (imc writes it)."""
        patch = _parse_body(headers, body, patch=True)
        media = _media_type(headers.get("content-type", ""))
        if media == APPLY_PATCH:
            if not (query.get("fieldManager") or [""])[-1]:
                raise ApiError(400, "BadRequest", "fieldManager is required for apply requests", name)
            if not self.caches.exists(name):
                if _claimed_name(patch) != name:
                    raise ApiError(400, "BadRequest", f"the name in the object does not match the name in the path "
                                   f"({_quote(name)})", name)
                created = self._create({"content-type": JSON}, json.dumps(patch).encode(), query)
                return 201, created
        current = self._get(name).to_object()
        try:
            if media == JSON_PATCH:
                patched = json_patch(current, patch)
            elif media == MERGE_PATCH:
                patched = merge_patch(current, patch)
            else:
                # One manager owns every field here: the applied object is the whole
                # intent for spec and annotations.
                metadata = patch.get("metadata") if isinstance(patch.get("metadata"), dict) else {}
                patched = {**current, "spec": patch.get("spec"),
                           "metadata": {**current["metadata"], "annotations": metadata.get("annotations") or {}}}
                if patch.get("apiVersion") != API_VERSION or patch.get("kind") != KIND:
                    patched["apiVersion"], patched["kind"] = patch.get("apiVersion"), patch.get("kind")
        except PatchError as e:
            raise ApiError(422, "Invalid", f"the patch does not apply to {RESOURCE}.{GROUP} {_quote(name)}: "
                           f"{e.message}", name, kind=KIND,
                           causes=[{"reason": "FieldValueInvalid", "message": _clip(e.message), "field": "patch"}]
                           ) from None
        if not isinstance(patched, dict):
            raise _invalid(name, "the patched document is not an object")
        patched.pop("status", None)
        if not _names_resource_version(patch) and isinstance(patched.get("metadata"), dict):
            # Only a patch that names a resourceVersion is conditional on it.
            patched["metadata"].pop("resourceVersion", None)
        return 200, self._replace(name, patched, query)

    def _watch(self, query: dict[str, list[str]], as_table: bool) -> Response:
        """``?watch=true``: ADDED, MODIFIED and DELETED events as JSON lines, from the
        ``resourceVersion`` asked for (or every cache as ADDED first when none is),
        until ``timeoutSeconds`` or the client goes."""
        wanted = _name_selector(query)
        since_text = (query.get("resourceVersion") or [""])[-1]
        if since_text not in ("", "0") and not (since_text.isascii() and since_text.isdigit() and len(since_text) < 19):
            raise ApiError(400, "BadRequest", f"resourceVersion {_clip(since_text, 40)!r} is not a resource version")
        # sendInitialEvents (kubectl 1.35 and later): every cache as ADDED, then a
        # bookmark that says the initial events are over.
        initial = _flag(query, "sendInitialEvents")
        since = int(since_text) if since_text not in ("", "0") and not initial else None
        timeout_text = (query.get("timeoutSeconds") or [str(MAX_WATCH_SECONDS)])[-1]
        if not (timeout_text.isascii() and timeout_text.isdigit() and len(timeout_text) < 10):
            raise ApiError(400, "BadRequest", f"timeoutSeconds {_clip(timeout_text, 40)!r} is not a number")
        seconds = min(max(int(timeout_text), 1), MAX_WATCH_SECONDS)
        include = (query.get("includeObject") or ["Metadata"])[-1]
        with self._watch_lock:
            if self._watches >= MAX_WATCHES:
                raise ApiError(429, "TooManyRequests", f"too many watches open (at most {MAX_WATCHES}); try again later",
                               headers={"Retry-After": "5"})
            self._watches += 1
        events = self._watch_events(wanted, since, time.monotonic() + seconds, initial)
        return Response(200, b"", JSON, {}, stream=_WatchStream(self, events, as_table, include))

    def _watch_ended(self) -> None:
        with self._watch_lock:
            self._watches -= 1

    def _watch_events(self, wanted: str | None, since: int | None, deadline: float,
                      initial_end: bool = False) -> Generator[tuple[str, dict[str, Any]], None, None]:
        """Poll the records' revision; on a change, compare every cache with what was
        last seen and yield what changed, in the order of the writes."""
        known: dict[str, dict[str, Any]] = {}
        revision = self.caches.revision()
        for cache in self.caches.list():
            if wanted is not None and cache.name != wanted:
                continue
            obj = cache.to_object()
            known[cache.name] = obj
            if since is None:
                yield "ADDED", obj
            elif cache.resource_version > since:
                yield "MODIFIED", obj
        if initial_end:
            yield "BOOKMARK", {"apiVersion": API_VERSION, "kind": KIND, "metadata": {
                "resourceVersion": str(revision), "annotations": {"k8s.io/initial-events-end": "true"}}}
        while time.monotonic() < deadline:
            time.sleep(WATCH_POLL_SECONDS)
            now = self.caches.revision()
            if now == revision:
                continue
            revision = now
            current = {c.name: c for c in self.caches.list() if wanted is None or c.name == wanted}
            changes: list[tuple[int, str, dict[str, Any]]] = []
            for name, obj in list(known.items()):
                if name not in current:
                    gone = copy.deepcopy(obj)
                    gone["metadata"]["resourceVersion"] = str(now)
                    changes.append((now, "DELETED", gone))
                    del known[name]
            for name, cache in current.items():
                before = known.get(name)
                if before is None or before["metadata"]["resourceVersion"] != str(cache.resource_version):
                    obj = cache.to_object()
                    known[name] = obj
                    changes.append((cache.resource_version, "MODIFIED" if before else "ADDED", obj))
            for _, kind, obj in sorted(changes, key=lambda c: c[0]):
                yield kind, obj


class _WatchStream:
    """A watch's events as JSON lines (a Table per event when the client asked for
    tables). ``close`` ends the watch and frees its slot, once, started or not."""

    def __init__(self, api: ImageCacheAPI, events: Generator[tuple[str, dict[str, Any]], None, None],
                 as_table: bool, include: str) -> None:
        self.api, self.events, self.as_table, self.include = api, events, as_table, include
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for kind, obj in self.events:
                if self.as_table and kind != "BOOKMARK":
                    obj = table([obj], now_utc(), self.include)
                yield json.dumps({"type": kind, "object": obj}).encode() + b"\n"
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.events.close()
            self.api._watch_ended()


# -- request parsing ------------------------------------------------------------------------------


class _StrictYAMLLoader(yaml.SafeLoader):
    """SafeLoader without aliases and with a nesting limit.

    Aliases are how a few hundred bytes of YAML become gigabytes once anything walks
    them (a validation message quoting a field does); an ImageCache never needs one.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ComposerError(None, None, "YAML aliases (*name) are not accepted", mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _parse_body(headers: dict[str, str], body: bytes, patch: bool = False) -> Any:
    """The request body as a document, by its Content-Type (sniffed when absent); with
    ``patch``, a patch by its media type (JSON patch is a list)."""
    declared = headers.get("content-length", "").strip()
    if "transfer-encoding" in headers:
        raise ApiError(411, "LengthRequired", "send the body with a Content-Length, not a Transfer-Encoding")
    # ASCII digits only: str.isdigit() accepts '²', and int() refuses more than 4300 digits.
    if declared and not (declared.isascii() and declared.isdigit()):
        raise ApiError(400, "BadRequest", f"the Content-Length header {_clip(declared, 40)!r} is not a number")
    if len(body) > MAX_BODY_BYTES or (declared and (len(declared) > 18 or int(declared) > MAX_BODY_BYTES)):
        raise ApiError(413, "RequestEntityTooLarge",
                       f"the request body is larger than the limit of {MAX_BODY_BYTES} bytes")
    media = _media_type(headers.get("content-type", ""))
    if patch and media not in PATCH_TYPES:
        raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted "
                       f"media types include: {', '.join(PATCH_TYPES)}")
    if not patch and media and media != JSON and media not in YAML_TYPES:
        raise ApiError(415, "UnsupportedMediaType", f"unsupported Content-Type {_clip(media)!r}: "
                       f"send {JSON} or {YAML}")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "BadRequest", "the request body is not UTF-8 text") from None
    if not text.strip():
        raise ApiError(400, "BadRequest", "the request body is empty: send one ImageCache object")
    is_json = media in (JSON, JSON_PATCH, MERGE_PATCH) or (not media and text.lstrip().startswith("{"))
    try:
        doc = json.loads(text) if is_json else yaml.load(text, Loader=_StrictYAMLLoader)
    except (ValueError, RecursionError) as e:  # json errors are ValueErrors; so is a 5000-digit int in either
        raise ApiError(400, "BadRequest", f"the request body is not valid {'JSON' if is_json else 'YAML'}: "
                       f"{_clip(str(e))}") from None
    except yaml.YAMLError as e:
        raise ApiError(400, "BadRequest", f"the request body is not valid YAML: {_clip(str(e))}") from None
    if media == JSON_PATCH:
        if not isinstance(doc, list):
            raise ApiError(400, "BadRequest", f"a JSON patch is a list of operations, not {type(doc).__name__}")
        return doc
    if not isinstance(doc, dict):
        raise ApiError(400, "BadRequest", "the request body must be one ImageCache object (a mapping), "
                       f"not {type(doc).__name__}")
    return doc


def _dry_run(query: dict[str, list[str]]) -> bool:
    values = query.get("dryRun", [])
    if any(v != "All" for v in values):
        raise ApiError(400, "BadRequest", 'dryRun: the only supported value is "All"')
    return bool(values)


def _claimed_name(obj: dict[str, Any]) -> str | None:
    """The name the object asks for, if it is a string, for the Status details."""
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return _clip(name, 253) if isinstance(name, str) else None


WARNINGS = "\0warnings"
"""The key under which a verb hands back warnings for the ``Warning`` header."""


def _names_resource_version(patch: Any) -> bool:
    if isinstance(patch, list):
        return any(isinstance(op, dict) and op.get("path") == "/metadata/resourceVersion" for op in patch)
    metadata = patch.get("metadata") if isinstance(patch, dict) else None
    return isinstance(metadata, dict) and metadata.get("resourceVersion") is not None


def _loopback(peer: str) -> bool:
    try:
        address = ipaddress.ip_address(peer.removeprefix("::ffff:"))
    except ValueError:
        return False
    return address.is_loopback


def _flag(query: dict[str, list[str]], key: str) -> bool:
    return (query.get(key) or ["false"])[-1].lower() in ("true", "1")


def _check_fields(obj: dict[str, Any], query: dict[str, list[str]]) -> list[str]:
    """``fieldValidation``: Strict refuses an object with unknown fields, Warn (the
    default) names them in warnings, Ignore says nothing."""
    mode = (query.get("fieldValidation") or ["Warn"])[-1]
    if mode not in ("Ignore", "Warn", "Strict"):
        raise ApiError(400, "BadRequest", f"fieldValidation {_clip(mode, 40)!r}: want Ignore, Warn or Strict")
    unknown = unknown_fields(obj) if mode != "Ignore" else []
    if unknown and mode == "Strict":
        fields_ = ", ".join(f'unknown field "{f}"' for f in unknown)
        raise ApiError(400, "BadRequest", f"{KIND} in version \"v1\" cannot be handled as a {KIND}: strict decoding "
                       f"error: {fields_}", _claimed_name(obj))
    return [f'unknown field "{f}"' for f in unknown]


def _name_selector(query: dict[str, list[str]]) -> str | None:
    """The one name a ``fieldSelector`` asks for (``metadata.name=NAME``, as ``kubectl
    wait`` and ``get NAME -w`` send), or None for every cache."""
    wanted = None
    for selector in query.get("fieldSelector", []):
        for term in filter(None, selector.split(",")):
            key, sep, value = term.partition("=")
            if key != "metadata.name" or not sep or value.startswith("="):
                raise ApiError(400, "BadRequest", f"fieldSelector {_clip(term, 100)!r}: only metadata.name=NAME "
                               "is supported")
            if wanted is not None and wanted != value:
                return "\0"  # two different names: nothing matches both
            wanted = value
    return wanted


def _as_table(objects: list[dict[str, Any]], query: dict[str, list[str]],
              list_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    include = (query.get("includeObject") or ["Metadata"])[-1]
    if include not in ("None", "Metadata", "Object"):
        raise ApiError(400, "BadRequest", f"includeObject {_clip(include, 40)!r}: want None, Metadata or Object")
    return table(objects, now_utc(), include, list_meta)


def _path_name(raw: str) -> str:
    """A name from the URL, checked before it is used for anything."""
    try:
        return validate_name(raw)
    except ValidationError:
        # The same answer as a lookup that finds nothing (no such cache can exist), with
        # the reason spelled out; the text is never used as a key or a path.
        raise ApiError(404, "NotFound", f"{RESOURCE}.{GROUP} {_quote(raw)} not found: not a valid name "
                       "(lowercase letters, digits and '-', starting and ending with a letter or digit, "
                       "at most 63 characters)") from None


# -- answers ----------------------------------------------------------------------------------------


def _clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _quote(name: str) -> str:
    return json.dumps(_clip(name, 100))


def _failure(code: int, reason: str, message: str, name: str | None = None, kind: str = RESOURCE,
             causes: list[dict[str, str]] | None = None) -> dict[str, Any]:
    details: dict[str, Any] = {"group": GROUP, "kind": kind}
    if name is not None:
        details = {"name": name, **details}
    if causes:
        details["causes"] = causes
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": _clip(message), "reason": reason, "details": details, "code": code}


def _conflict(name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict", f"Operation cannot be fulfilled on {RESOURCE}.{GROUP} {_quote(name)}: {why}",
                    name)


def _not_found(name: str) -> ApiError:
    return ApiError(404, "NotFound", f"{RESOURCE}.{GROUP} {_quote(name)} not found", name)


def _already_exists(name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f"{RESOURCE}.{GROUP} {_quote(name)} already exists", name)


def _invalid(name: str | None, message: str) -> ApiError:
    who = f"{KIND}.{GROUP} {_quote(name)}" if name else f"{KIND}.{GROUP}"
    # kubectl prints an Invalid Status as 'The KIND "NAME" is invalid: FIELD: MESSAGE'
    # from its details, so the kind is the Kind and the field is a cause of its own.
    return ApiError(422, "Invalid", f"{who} is invalid: {message}", name, kind=KIND, causes=[_cause(message)])


SPEC_FIELDS = ("images", "imagePullSecrets", "imageCacheSize", "retentionDays")


def _cause(message: str) -> dict[str, str]:
    """A validation message (``FIELD: what is wrong``) as a StatusCause naming the field
    by its path in the object."""
    head, sep, rest = message.partition(": ")
    if not sep:
        return {"reason": "FieldValueInvalid", "message": _clip(message), "field": "spec"}
    if head.startswith("annotation "):
        path = f"metadata.annotations[{head.removeprefix('annotation ')}]"
    elif head.startswith("name "):
        path = "metadata.name"
    elif head.split(".")[0] in SPEC_FIELDS:
        path = f"spec.{head}"
    elif " " not in head:
        path = head
    else:
        path, rest = "spec", message
    return {"reason": "FieldValueInvalid", "message": _clip(rest), "field": _clip(path, 200)}


def _not_allowed(method: str, allow: str, what: str) -> ApiError:
    return ApiError(405, "MethodNotAllowed", f"method {_clip(method, 20)} is not allowed on {what}; "
                    f"Allow: {allow}", headers={"Allow": allow})


def _negotiate(accept: str) -> str:
    """JSON unless the client prefers YAML (by order, then q-value) in ``Accept``."""
    best, best_q = JSON, -1.0
    for item in accept.split(","):
        media, *params = [p.strip() for p in item.split(";")]
        media = media.lower()
        q = 1.0
        for p in params:
            if p.lower().startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        fmt = JSON if media in (JSON, "*/*", "application/*") else YAML if media in YAML_TYPES else None
        if fmt is not None and q > 0 and q > best_q:
            best, best_q = fmt, q
    return best


def _render(status: int, doc: dict[str, Any], fmt: str, headers: dict[str, str] | None = None) -> Response:
    if fmt == YAML:
        body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False).encode()
    else:
        body = json.dumps(doc).encode()
    return Response(status, body, fmt, dict(headers or {}))
