"""The Kubernetes-style ImageCache API, as a handler with no transport of its own.

An HTTP server routes every request under ``ImageCacheAPI.PREFIX`` to
``ImageCacheAPI.handle(method, path, headers, body)`` and writes back the
``Response``. Keeping HTTP out of this module means every answer, including every
refusal, can be tested by calling one method, and the server stays a thin shell.

The answers follow the Kubernetes API conventions, so ``kubectl``-minded users and
clients meet what they expect:

    POST   PREFIX          create (YAML or JSON body)   201 ImageCache
    GET    PREFIX          list                         200 ImageCacheList
    GET    PREFIX/{name}   read                         200 ImageCache
    DELETE PREFIX/{name}   delete                       200 Status (Success)

and every error is a ``Status`` object with ``status: Failure``, a ``reason`` and the
HTTP ``code``. A refused request changes nothing: a body is parsed and validated in
full before ``Caches.create`` is called, and a name taken from the path is checked
against DNS-1123 before it is looked up anywhere.

Builds are slow (they pull images), so POST answers at once with the object in phase
Creating and hands the build to a ``BuildRunner``, a small bounded thread pool; the
record's status and progress then move as the build goes, and GET shows them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, Self
from urllib.parse import parse_qs, urlsplit

import yaml
from yaml.composer import ComposerError

from builder.caches import BuildLease, Caches
from builder.errors import (
    CacheStateError,
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
from builder.server.discovery import GROUP, KIND, LIST_KIND, RESOURCE, documents, table, wants_table

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
"""The largest request body accepted; a server may stop reading beyond it."""
MAX_YAML_DEPTH = 64
"""An ImageCache object nests four levels deep; far deeper is an attack, not a cache."""
MAX_MESSAGE_CHARS = 1024
"""Status messages quote the input they refuse; a huge field is not echoed back whole."""

JSON = "application/json"
YAML = "application/yaml"
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})


class RunnerClosedError(ImcError):
    """The build runner is shut down (the server is stopping): no new builds start."""

    exit_code = 13


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

    def __init__(self, caches: Caches, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.caches = caches
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imc-build")
        self._lock = threading.RLock()  # RLock: a done callback may run inside submit
        self._leases: dict[Future[None], BuildLease] = {}
        self._closed = False

    def submit(self, name: str, lease: BuildLease) -> None:
        """Queue ``caches.build(name, lease)``; raises RunnerClosedError after shutdown."""
        with self._lock:
            if self._closed:
                lease.release()
                raise RunnerClosedError("the build runner is shut down: no new builds are accepted")
            future = self._pool.submit(self._run, name, lease)
            self._leases[future] = lease
        future.add_done_callback(self._done)

    def _run(self, name: str, lease: BuildLease) -> None:
        try:
            self.caches.build(name, lease)
        except NotFoundLocalError:
            pass  # deleted while it was building: nothing is left to report to
        except Exception:
            # caches.build records build failures on the cache itself; anything that
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

    def __init__(self, caches: Caches, builds: BuildSubmitter) -> None:
        self.caches = caches
        self.builds = builds

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Answer one request. Never raises: every failure is a Status object."""
        lowered = {str(k).lower(): str(v) for k, v in headers.items()}
        fmt = _negotiate(lowered.get("accept", ""))
        try:
            status, doc = self._dispatch(method.upper(), path, lowered, body)
            return _render(status, doc, fmt)
        except ApiError as e:
            return _render(e.code, _failure(e.code, e.reason, e.message, e.name, e.kind, e.causes), fmt, e.headers)
        except Exception:
            # Never leak a traceback or an internal message (paths, hosts) to a client.
            log.exception("%s %s failed unexpectedly", method, path)
            return _render(500, _failure(500, "InternalError", "an internal error occurred; see the server log"),
                           fmt)

    # -- routing --------------------------------------------------------------------------

    def _dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
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
        if method not in ("GET", "DELETE"):
            raise _not_allowed(method, "GET, DELETE", "an image cache")
        name = _path_name(raw_name)
        if method == "GET":
            obj = self._get(name).to_object()
            return 200, _as_table([obj], query) if as_table else obj
        return 200, self._delete(name)

    # -- the verbs --------------------------------------------------------------------------

    def _list(self, query: dict[str, list[str]]) -> dict[str, Any]:
        wanted = _name_selector(query)
        items = [c.to_object() for c in self.caches.list() if wanted is None or c.name == wanted]
        return {"apiVersion": API_VERSION, "kind": LIST_KIND, "metadata": {}, "items": items}

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
                "details": {"name": cache.name, "group": GROUP, "kind": RESOURCE, "uid": cache.id}}

    def _create(self, headers: dict[str, str], body: bytes, query: dict[str, list[str]]) -> dict[str, Any]:
        dry_run = _dry_run(query)
        obj = _parse_body(headers, body)
        claimed = _claimed_name(obj)
        try:
            name, spec, no_effect = spec_from_object(obj)
        except ValidationError as e:
            raise _invalid(claimed, e.message) from None
        if dry_run:
            return self._would_create(name, spec, no_effect)
        try:
            cache, lease = self.caches.create(name, spec, no_effect=no_effect)
        except ValidationError as e:
            # The record store says "already exists" with the same error type as a bad
            # field; the spec was validated above, so a name that now exists is the cause.
            if self._exists(name):
                raise _already_exists(name) from None
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
        return cache.to_object()

    def _would_create(self, name: str, spec: CacheSpec, no_effect: AnnotationReport) -> dict[str, Any]:
        """``dryRun=All``: the checks ``create`` makes, none of its writes."""
        if self._exists(name):
            raise _already_exists(name)
        try:
            for secret in spec.image_pull_secrets:
                self.caches.secrets.load(secret)
        except ValidationError as e:
            raise _invalid(name, e.message) from None
        settings = self.caches.settings
        manual = sum(1 for c in self.caches.db.list() if not c.auto)
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

    def _exists(self, name: str) -> bool:
        try:
            self.caches.db.get(name)
        except NotFoundLocalError:
            return False
        return True


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


def _parse_body(headers: dict[str, str], body: bytes) -> Any:
    """The request body as a document, by its Content-Type (sniffed when absent)."""
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
    if media and media != JSON and media not in YAML_TYPES:
        raise ApiError(415, "UnsupportedMediaType", f"unsupported Content-Type {_clip(media)!r}: "
                       f"send {JSON} or {YAML}")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "BadRequest", "the request body is not UTF-8 text") from None
    if not text.strip():
        raise ApiError(400, "BadRequest", "the request body is empty: send one ImageCache object")
    is_json = media == JSON or (not media and text.lstrip().startswith("{"))
    try:
        doc = json.loads(text) if is_json else yaml.load(text, Loader=_StrictYAMLLoader)
    except (ValueError, RecursionError) as e:  # json errors are ValueErrors; so is a 5000-digit int in either
        raise ApiError(400, "BadRequest", f"the request body is not valid {'JSON' if is_json else 'YAML'}: "
                       f"{_clip(str(e))}") from None
    except yaml.YAMLError as e:
        raise ApiError(400, "BadRequest", f"the request body is not valid YAML: {_clip(str(e))}") from None
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
