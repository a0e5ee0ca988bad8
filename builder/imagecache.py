"""The ImageCache resource: its spec and validation, status and events.

A cache's record is the truth about it: what was asked (spec), where it stands
(phase, progress, events), and what it holds (resolved images, its volume, the
blobs it pins in the store while staging). The records are kept by
``builder.records``, behind ``Caches``.

Validation happens before anything is written: a spec that breaks a rule raises
``ValidationError`` naming the field and its limit.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import secrets
import string
import uuid
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from builder import reference
from builder.errors import ValidationError
from builder.registry.auth import SecretStore
from builder.registry.hosts import parse_endpoint_list
from builder.registry.retry import RetryPolicy
from builder.store import write_atomic

API_VERSION = "eci.alibabacloud.com/v1"
KIND = "ImageCache"
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
MAX_IMAGES = 20
SIZE_MIN, SIZE_MAX, SIZE_DEFAULT = 20, 32768, 20
RETENTION_MIN, RETENTION_MAX = 1, 65536
FAILED_RETENTION = dt.timedelta(hours=24)
GIB = 1 << 30

CREATING, READY, FAILED, UPDATING, UPDATE_FAILED = "Creating", "Ready", "Failed", "Updating", "UpdateFailed"
PHASES = (CREATING, READY, FAILED, UPDATING, UPDATE_FAILED)
BUILDING = (CREATING, UPDATING)

ANNOTATION_PREFIX = "k8s.aliyun.com/"
A_REUSE = ANNOTATION_PREFIX + "imc-enable-reuse"
A_FLASH = ANNOTATION_PREFIX + "imc-enable-flash"
A_RETENTION = ANNOTATION_PREFIX + "imc-retention-days"
A_SIZE = ANNOTATION_PREFIX + "imc-size"
A_PLAIN_HTTP = ANNOTATION_PREFIX + "plain-http-registry"
A_INSECURE = ANNOTATION_PREFIX + "insecure-registry"
KNOWN_ANNOTATIONS = (A_REUSE, A_FLASH, A_RETENTION, A_SIZE, A_PLAIN_HTTP, A_INSECURE)
# The documentation's placement, networking and cloud-registry annotations: meaningful
# to the hosted service, not to a cache on one machine. Accepted, recorded, reported.
# imc's own annotations, for what only imc does (the hosted service has no such option).
IMC_ANNOTATION_PREFIX = "imc.dev/"
A_ON_DRIFT = IMC_ANNOTATION_PREFIX + "on-drift"
IMC_ANNOTATIONS = (A_ON_DRIFT,)
ON_DRIFT_IGNORE, ON_DRIFT_UPDATE = "ignore", "update"
ON_DRIFT = (ON_DRIFT_IGNORE, ON_DRIFT_UPDATE)
CLOUD_ONLY_ANNOTATIONS = tuple(ANNOTATION_PREFIX + a for a in (
    "vswitch-ids", "security-group-id", "resource-group-id", "acr-instance-ids", "eip-instance-id",
    "auto-create-eip", "eip-bandwidth", "eip-internet-charge-type", "eip-isp", "eip-common-bandwidth-package-id"))


@dataclass(frozen=True)
class AnnotationReport:
    """Annotations a spec accepted without effect: the documented cloud-only ones, and
    ``k8s.aliyun.com/`` ones nobody documents (a typo, or a pod's annotation on a cache).
    The cache's events say so; the annotations themselves stay in its metadata."""

    cloud_only: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()

    def record(self, cache: ImageCache, when: dt.datetime | None = None) -> None:
        if self.cloud_only:
            cache.event("AnnotationIgnored", f"{', '.join(self.cloud_only)}: cloud placement and networking, "
                        "no effect on a local image cache", when=when)
        for key in self.unknown:
            cache.event("UnknownAnnotation", f"{key} is not a known image cache annotation; ignored", "Warning",
                        when=when)


def now_utc() -> dt.datetime:
    """The current time, UTC, to the second (what records and events carry)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def rfc3339(t: dt.datetime | None) -> str | None:
    """``2026-11-29T20:50:00Z``, as Kubernetes objects write times."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def parse_time(text: str | None) -> dt.datetime | None:
    """The inverse of ``rfc3339``."""
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC) if text else None


ID_PREFIX = "imc-"


def new_cache_id() -> str:
    """``imc-`` and 17 random lowercase alphanumerics, like the hosted service's ids."""
    alphabet = string.ascii_lowercase + string.digits
    return ID_PREFIX + "".join(secrets.choice(alphabet) for _ in range(17))


# -- the spec ----------------------------------------------------------------------------


def _bool_annotation(key: str, value: str) -> bool:
    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValidationError(f'annotation {key}: want "true" or "false", got {value!r}')


def _int_in(field_name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValidationError(f"{field_name}: want an integer from {low} to {high}, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValidationError(f"{field_name}: want an integer from {low} to {high}, got {value!r}") from None
    if not low <= number <= high:
        # str() of an int past 4300 digits raises (a YAML hex literal makes one cheaply).
        shown = number if abs(number) < 10 ** 18 else "a number of more than 18 digits"
        raise ValidationError(f"{field_name}: {shown} is out of range (valid {low} to {high})")
    return number


@dataclass
class CacheSpec:
    """What a user asks for. Every field is validated by ``validated()``."""

    images: list[str]
    image_pull_secrets: list[str] = field(default_factory=list)
    size_gib: int = SIZE_DEFAULT
    retention_days: int | None = None
    reuse: bool = False
    flash: bool = False
    plain_http: list[str] = field(default_factory=list)
    insecure: list[str] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    on_drift: str = ON_DRIFT_IGNORE  # what a moved tag does: ignore (report it) or update (rebuild)

    def validated(self) -> CacheSpec:
        """A normalised copy, or ValidationError naming the first broken rule."""
        if not isinstance(self.images, list) or not self.images:
            raise ValidationError(f"images: at least 1 image is required (at most {MAX_IMAGES})")
        if len(self.images) > MAX_IMAGES:
            raise ValidationError(f"images: {len(self.images)} images given, at most {MAX_IMAGES} are allowed")
        images = []
        for text in self.images:
            if not isinstance(text, str):
                raise ValidationError(f"images: {text!r} is not an image reference")
            ref = str(reference.parse(text))
            if ref not in images:
                images.append(ref)
        for secret in self.image_pull_secrets:
            if not isinstance(secret, str):
                raise ValidationError(f"imagePullSecrets: {secret!r} is not namespace:name")
            SecretStore.split_name(secret)
        size = _int_in("imageCacheSize", self.size_gib, SIZE_MIN, SIZE_MAX)
        retention = None
        if self.retention_days is not None:
            retention = _int_in("retentionDays", self.retention_days, RETENTION_MIN, RETENTION_MAX)
        if self.on_drift not in ON_DRIFT:
            raise ValidationError(f"on-drift: want {' or '.join(ON_DRIFT)}, got {self.on_drift!r}")
        return CacheSpec(images, list(dict.fromkeys(self.image_pull_secrets)), size, retention, bool(self.reuse),
                         bool(self.flash), sorted(parse_endpoint_list(self.plain_http)),
                         sorted(parse_endpoint_list(self.insecure)), dict(self.annotations), self.on_drift)

    @classmethod
    def from_annotations(cls, base: CacheSpec, annotations: dict[str, Any]) -> tuple[CacheSpec, AnnotationReport]:
        """Apply ``k8s.aliyun.com/…`` annotations over ``base``.

        Returns the spec and a report of the annotations accepted without effect, which
        the caller records as events. A null value is an unset annotation. An unknown
        ``imc-`` annotation is an error: it is almost certainly a typo of a real one.
        """
        spec = CacheSpec(**{f.name: getattr(base, f.name) for f in fields(CacheSpec)})
        given = {key: value for key, value in annotations.items() if value is not None}
        spec.annotations = {**base.annotations, **given}
        cloud_only, unknown = [], []
        for key, value in given.items():
            if not isinstance(value, str):
                raise ValidationError(f"annotation {key}: values must be strings, got {value!r}")
            if key == A_ON_DRIFT:
                if value.strip().lower() not in ON_DRIFT:
                    raise ValidationError(f'annotation {key}: want "{ON_DRIFT_UPDATE}" or "{ON_DRIFT_IGNORE}", '
                                          f"got {value!r}")
                spec.on_drift = value.strip().lower()
            elif key.startswith(IMC_ANNOTATION_PREFIX):
                raise ValidationError(f"unknown annotation {key} (known: {', '.join(IMC_ANNOTATIONS)})")
            if not key.startswith(ANNOTATION_PREFIX):
                continue
            if key == A_REUSE:
                spec.reuse = _bool_annotation(key, value)
            elif key == A_FLASH:
                spec.flash = _bool_annotation(key, value)
            elif key == A_RETENTION:
                spec.retention_days = _int_in(f"annotation {key}", value, RETENTION_MIN, RETENTION_MAX)
            elif key == A_SIZE:
                spec.size_gib = _int_in(f"annotation {key}", value, SIZE_MIN, SIZE_MAX)
            elif key == A_PLAIN_HTTP:
                spec.plain_http = sorted(parse_endpoint_list(value))
            elif key == A_INSECURE:
                spec.insecure = sorted(parse_endpoint_list(value))
            elif key in CLOUD_ONLY_ANNOTATIONS:
                cloud_only.append(key)
            elif key[len(ANNOTATION_PREFIX):].startswith("imc-"):
                known = ", ".join(a[len(ANNOTATION_PREFIX):] for a in KNOWN_ANNOTATIONS)
                raise ValidationError(f"unknown annotation {key} (known: {known})")
            else:
                unknown.append(key)
        return spec, AnnotationReport(tuple(cloud_only), tuple(unknown))


def validate_name(name: str) -> str:
    """A DNS-1123 label: lowercase letters, digits and '-', at most 63, alphanumeric ends."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80]) + "…"
        raise ValidationError(
            f"name {shown}: must be lowercase letters, digits and '-', start and end with a letter or "
            "digit, at most 63 characters")
    return name


# -- the status ----------------------------------------------------------------------------


@dataclass
class Event:
    """One timestamped, typed, human-readable step in a cache's life."""

    time: str
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class ResolvedImage:
    """An image as a cache holds it: the name asked for and the manifest it resolved to."""

    name: str
    digest: str
    media_type: str
    size: int
    index: str | None = None
    index_media_type: str | None = None
    index_size: int | None = None
    platform: str | None = None


@dataclass
class Condition:
    """A Kubernetes-style condition: whether something holds of the cache (``status``
    "True" or "False"), why, and since when (``last_transition_time`` moves only when
    ``status`` does)."""

    type: str
    status: str
    reason: str
    message: str
    last_transition_time: str
    observed_generation: int


STALE_CONDITION = "Stale"
"""The condition a moved tag sets: the cache holds what a tag pointed at, not what it points at now."""


@dataclass
class VolumeInfo:
    """The packed volume that serves a cache."""

    path: str
    content_bytes: int
    blob_bytes: int
    capacity_bytes: int
    generation: int


@dataclass
class ImageCache:
    """A cache record: spec, identity, status, and what it holds."""

    name: str
    id: str
    spec: CacheSpec
    created: str
    phase: str = CREATING
    progress: int = 0
    start_time: str | None = None
    last_updated: str | None = None
    expire: str | None = None
    last_used: str | None = None
    hit_count: int = 0
    auto: bool = False
    instance_id: str | None = None
    events: list[Event] = field(default_factory=list)
    images: list[ResolvedImage] = field(default_factory=list)
    pinned: list[ResolvedImage] = field(default_factory=list)
    volume: VolumeInfo | None = None
    volume_state: str = "none"  # none | packing | ready | failed
    bytes_fetched: int = 0
    bytes_reused: int = 0
    unpacked_bytes: int = 0
    message: str = ""
    generation: int = 0
    resource_version: int = 0
    spec_generation: int = 1
    conditions: list[Condition] = field(default_factory=list)
    moved_tags: dict[str, str] = field(default_factory=dict)  # image -> the digest its tag points at now
    drift_warned: str | None = None  # the last DriftCheckFailed event, which comes at most hourly

    # -- state --------------------------------------------------------------------

    def event(self, reason: str, message: str, type_: str = "Normal", when: dt.datetime | None = None) -> None:
        """Append an event and touch ``lastUpdatedTime``."""
        stamp = rfc3339(when or now_utc())
        self.events.append(Event(stamp, type_, reason, message))  # type: ignore[arg-type]
        self.last_updated = stamp

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def set_condition(self, type_: str, status: bool, reason: str, message: str,
                      when: dt.datetime | None = None) -> None:
        """Set a condition; its transition time moves only when its status changes."""
        shown = "True" if status else "False"
        old = self.condition(type_)
        since = old.last_transition_time if old is not None and old.status == shown else rfc3339(when or now_utc())
        new = Condition(type_, shown, reason, message, since or "", self.spec_generation)
        self.conditions = [new if c.type == type_ else c for c in self.conditions] if old else [*self.conditions, new]

    @property
    def stale(self) -> bool:
        """Whether a tag the cache was built from points at other content now."""
        found = self.condition(STALE_CONDITION)
        return found is not None and found.status == "True"

    def resolved_again(self, when: dt.datetime | None = None) -> None:
        """A build resolved every tag anew: what was stale is current."""
        self.moved_tags = {}
        if self.condition(STALE_CONDITION) is not None:
            self.set_condition(STALE_CONDITION, False, "Rebuilt", "the cache was rebuilt from the digests its tags point at",
                               when)

    def set_progress(self, percent: int) -> None:
        """Progress only rises while a phase lasts."""
        self.progress = max(self.progress, min(100, max(0, int(percent))))

    def enter(self, phase: str, when: dt.datetime | None = None) -> None:
        """Move to ``phase``; progress restarts with it, except that Ready is 100%."""
        if phase != self.phase:
            self.phase = phase
            self.progress = 100 if phase == READY else 0
        self.last_updated = rfc3339(when or now_utc())

    def retention_expiry(self) -> str | None:
        """End of the retention period, counted from creation; None means never."""
        if self.spec.retention_days is None:
            return None
        created = parse_time(self.created)
        assert created is not None
        return rfc3339(created + dt.timedelta(days=self.spec.retention_days))

    @property
    def source(self) -> str | None:
        """Where pulls are served from: the packed volume, else (flash) the store's
        staging copy, which the cache pins until its volume is complete."""
        if self.phase == CREATING or self.phase == FAILED or not self.images:
            return None
        if self.volume is not None and self.volume_state == "ready":
            return "volume"
        pinned = {i.digest for i in self.pinned}
        if all(i.digest in pinned for i in self.images):
            return "staging"
        return None

    @property
    def uid(self) -> str:
        """``metadata.uid``: a UUID, derived from the id (unique, stable for the cache's
        life), so records written before it existed have one too."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"imc:{self.id}"))

    @property
    def observed_generation(self) -> int:
        """The spec generation the status describes: the previous one while a build for
        the current spec is running, else the current one."""
        return self.spec_generation - 1 if self.phase in BUILDING else self.spec_generation

    # -- persistence form ---------------------------------------------------------

    def to_doc(self) -> dict[str, Any]:
        """The record as JSON-ready data, equal to ``dataclasses.asdict`` (which deep-copies
        every leaf: the cost of a match's write, on a record with dozens of events)."""
        return plain(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ImageCache:
        doc = dict(doc)
        doc["spec"] = CacheSpec(**doc["spec"])
        doc["events"] = [Event(**e) for e in doc.get("events", [])]
        doc["images"] = [ResolvedImage(**i) for i in doc.get("images", [])]
        doc["pinned"] = [ResolvedImage(**i) for i in doc.get("pinned", [])]
        doc["volume"] = VolumeInfo(**doc["volume"]) if doc.get("volume") else None
        doc["conditions"] = [Condition(**c) for c in doc.get("conditions", [])]
        return cls(**doc)

    # -- the Kubernetes-style object ---------------------------------------------------

    def to_object(self) -> dict[str, Any]:
        """The ``ImageCache`` object as the API and ``-o yaml`` show it."""
        spec: dict[str, Any] = {"images": list(self.spec.images), "imageCacheSize": self.spec.size_gib}
        if self.spec.image_pull_secrets:
            spec["imagePullSecrets"] = list(self.spec.image_pull_secrets)
        if self.spec.retention_days is not None:
            spec["retentionDays"] = self.spec.retention_days
        annotations = dict(self.spec.annotations)
        if self.spec.reuse:
            annotations[A_REUSE] = "true"
        if self.spec.flash:
            annotations[A_FLASH] = "true"
        if self.spec.plain_http:
            annotations[A_PLAIN_HTTP] = ",".join(self.spec.plain_http)
        if self.spec.insecure:
            annotations[A_INSECURE] = ",".join(self.spec.insecure)
        if self.spec.on_drift != ON_DRIFT_IGNORE or A_ON_DRIFT in annotations:
            annotations[A_ON_DRIFT] = self.spec.on_drift
        metadata: dict[str, Any] = {"name": self.name, "uid": self.uid, "resourceVersion": str(self.resource_version),
                                    "generation": self.spec_generation, "creationTimestamp": self.created}
        if annotations:
            metadata["annotations"] = annotations
        if self.auto:
            metadata["labels"] = {"imc.auto-created": "true"}
        status: dict[str, Any] = {
            "phase": self.phase,
            "progress": f"{self.progress}%",
            "imageCacheId": self.id,
            "observedGeneration": self.observed_generation,
            "startTime": self.start_time,
            "lastUpdatedTime": self.last_updated,
            "expireDateTime": self.expire,
            "source": self.source,
            "bytesFetched": self.bytes_fetched,
            "bytesReused": self.bytes_reused,
            "unpackedBytes": self.unpacked_bytes,
            "volume": {"state": self.volume_state, **({
                "path": self.volume.path, "contentBytes": self.volume.content_bytes,
                "blobBytes": self.volume.blob_bytes, "capacityBytes": self.volume.capacity_bytes,
            } if self.volume else {})},
            "images": [{"name": i.name, "digest": i.digest, **({"platform": i.platform} if i.platform else {})}
                       for i in self.images],
            "events": [asdict(e) for e in self.events],
        }
        if self.last_used:
            status["lastUsedTime"] = self.last_used
        if self.conditions:
            status["conditions"] = [{"type": c.type, "status": c.status, "reason": c.reason, "message": c.message,
                                     "lastTransitionTime": c.last_transition_time,
                                     "observedGeneration": c.observed_generation} for c in self.conditions]
        status["hitCount"] = self.hit_count
        if self.message:
            status["message"] = self.message
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec, "status": status}


def spec_from_object(obj: Any) -> tuple[str, CacheSpec, AnnotationReport]:
    """Read an ``ImageCache`` object (parsed YAML or JSON): its name, spec, and the
    annotations accepted without effect. Raises ValidationError naming the field.

    As in Kubernetes, an optional field that is null (``imageCacheSize:`` with no value,
    as the documentation's own examples write it) is an unset field: its default holds.
    """
    if not isinstance(obj, dict):
        raise ValidationError("ImageCache: the document is not an object")
    if obj.get("apiVersion") != API_VERSION:
        raise ValidationError(f"apiVersion: want {API_VERSION}, got {obj.get('apiVersion')!r}")
    if obj.get("kind") != KIND:
        raise ValidationError(f"kind: want {KIND}, got {obj.get('kind')!r}")
    metadata = obj.get("metadata") or {}
    spec_obj = obj.get("spec") or {}
    if not isinstance(metadata, dict) or not isinstance(spec_obj, dict):
        raise ValidationError("metadata and spec must be objects")
    name = validate_name(metadata.get("name"))  # type: ignore[arg-type]
    known = {"images", "imagePullSecrets", "imageCacheSize", "retentionDays"}
    unknown = sorted(set(spec_obj) - known)
    if unknown:
        raise ValidationError(f"spec: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    images = spec_obj.get("images")
    if not isinstance(images, list):
        raise ValidationError(f"spec.images: want a list of 1 to {MAX_IMAGES} image references")
    secrets_ = spec_obj.get("imagePullSecrets") or []
    if not isinstance(secrets_, list):
        raise ValidationError("spec.imagePullSecrets: want a list of namespace:name")
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ValidationError("metadata.annotations: want a map of strings")
    size = spec_obj.get("imageCacheSize")
    base = CacheSpec(images=images, image_pull_secrets=secrets_, size_gib=SIZE_DEFAULT if size is None else size,
                     retention_days=spec_obj.get("retentionDays"))
    spec, report = CacheSpec.from_annotations(base, {str(k): v for k, v in annotations.items()})
    return name, spec.validated(), report


_LEAVES = (str, int, float, bool, type(None))
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def plain(value: Any) -> Any:
    """``dataclasses.asdict`` for the record's types, sharing the immutable leaves (strings,
    numbers, None) instead of deep-copying them: containers are new, so the result can
    be changed without touching ``value``."""
    kind = type(value)
    if kind in _LEAVES:
        return value
    if kind is list:
        return [plain(v) for v in value]
    if kind is dict:
        return {plain(k): plain(v) for k, v in value.items()}
    names = _FIELD_NAMES.get(kind)
    if names is None:
        if not is_dataclass(kind):
            return copy.deepcopy(value)  # none in a record: asdict's own rule for other values
        names = _FIELD_NAMES.setdefault(kind, tuple(f.name for f in fields(value)))
    return {name: plain(getattr(value, name)) for name in names}


def match_keys(cache: ImageCache) -> set[tuple[str, str]]:
    """The (repository, version) pairs a cache holds, for the matcher: each spec image
    with its tag or digest, and each resolved image with its manifest and index digests
    (so a request pinned by digest finds a cache that was asked for by tag)."""
    keys = set()
    for text in cache.spec.images:
        ref = reference.parse(text)
        keys.add((ref.name, ref.identifier))
    for image in cache.images:
        name = reference.parse(image.name).name
        keys.add((name, image.digest))
        if image.index:
            keys.add((name, image.index))
    return keys


# -- settings ------------------------------------------------------------------------------


@dataclass
class Settings:
    """Policies as data: quotas, automatic-cache expiry and how long a pull may wait,
    in ``settings.json``.

    ``auto_max_bytes`` is a budget for the automatic caches' volumes together (0: none):
    past it, the least recently used go first (``builder.retirement``).

    ``pull_stall_seconds`` bounds the time a download may go without receiving a byte
    (0: no bound); ``pull_timeout_seconds`` bounds a whole pull, build or transfer (0:
    none). They apply to the CLI (where ``--timeout`` overrides the second), to builds
    the API starts and to pull-through.
    """

    max_manual_caches: int = 100
    auto_unused_days: int = 30
    auto_max_bytes: int = 0
    pull_stall_seconds: int = 120
    pull_timeout_seconds: int = 0

    @property
    def max_auto_caches(self) -> int:
        """Automatic caches have their own quota, half the manual one."""
        return self.max_manual_caches // 2

    @classmethod
    def load(cls, path: Path) -> Settings:
        """The settings in ``path`` (``Home.settings``), or the defaults when it is absent."""
        if not path.exists():
            return cls()
        try:
            doc = json.loads(path.read_text())
            return cls(**{f.name: int(doc[f.name]) for f in fields(cls) if f.name in doc})
        except (ValueError, TypeError) as e:
            raise ValidationError(f"{path} is not valid settings: {e}") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(asdict(self), indent=2).encode())

    @staticmethod
    def field_names() -> list[str]:
        return [f.name for f in fields(Settings)]

    def retry_policy(self, timeout: float | None = None) -> RetryPolicy:
        """The registry retry policy these settings give, its deadline counted from now:
        ``timeout`` seconds if given, else ``pull_timeout_seconds`` (0 for none)."""
        seconds = timeout if timeout is not None else self.pull_timeout_seconds
        return RetryPolicy(stall=self.pull_stall_seconds or float("inf")).until(seconds or None)

