"""Choosing a cache for a container: the matcher.

A request names the container's images and its declared temporary storage, and may
name a cache id or ask for auto-match. The rules, in order:

1. An explicit cache id must exist and be Ready; it is the answer.
2. Otherwise keep the Ready caches whose size satisfies the requested storage, and
   rank them by match degree (each requested image held with the same repository
   and version counts above one held in another version), then by size closest to
   the request, then newest.
3. With auto-match and no match, an automatic cache ``auto-create-for-<instance>``
   is created from the request (20 GiB plus the storage) and is the answer.

Every hit marks the cache as used, which keeps automatic caches from expiring.

Ranking is done by SQLite over the records' match index (``Caches.ranked``): only
the Ready caches holding a requested repository, as small rows, scored and ordered
there (for one image, a walk of an index in ranking order that stops at the limit),
so a choice among thousands of caches costs a query or two and one record update,
not a decode of every record.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from builder import reference
from builder.caches import BuildLease, Caches
from builder.errors import CacheStateError, NotFoundLocalError, ValidationError
from builder.imagecache import (
    A_INSECURE,
    A_PLAIN_HTTP,
    GIB,
    READY,
    SIZE_DEFAULT,
    SIZE_MAX,
    CacheSpec,
    ImageCache,
    match_keys,
    validate_name,
)
from builder.registry.auth import SecretStore
from builder.registry.hosts import parse_endpoint_list

AUTO_PREFIX = "auto-create-for-"
ANNOTATION_AUTO = "k8s.aliyun.com/eci-image-cache"
ANNOTATION_SNAPSHOT = "k8s.aliyun.com/eci-image-snapshot-id"
RANKING_LIMIT = 10  # candidates reported with a match; the winner is the first


@dataclass(frozen=True)
class MatchRequest:
    """What a container asks for.

    ``plain_http``, ``insecure`` and ``pull_secrets`` are used only to build an
    automatic cache: matching itself never talks to a registry.
    """

    images: tuple[str, ...]
    storage_gib: int = 0
    cache_id: str | None = None
    auto_match: bool = False
    instance_id: str | None = None
    warnings: tuple[str, ...] = ()
    plain_http: tuple[str, ...] = ()
    insecure: tuple[str, ...] = ()
    pull_secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Entry:
    """What ranking needs to know of a cache: its identity, size, age and the
    (repository, version) pairs it holds.

    ``keys`` is empty in the candidates of ``rank_index``, which reads them in SQL.
    """

    name: str
    id: str
    size_gib: int
    created: str
    keys: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def of(cls, cache: ImageCache) -> Entry:
        return cls(cache.name, cache.id, cache.spec.size_gib, cache.created, frozenset(match_keys(cache)))


@dataclass
class Candidate:
    """A cache considered for a request, with the numbers it was ranked by."""

    entry: Entry
    exact: int
    same_repository: int

    @property
    def degree(self) -> tuple[int, int]:
        return (self.exact, self.same_repository)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.entry.name, "imageCacheId": self.entry.id, "exactImages": self.exact,
                "sameRepositoryImages": self.same_repository, "imageCacheSize": self.entry.size_gib,
                "created": self.entry.created}


@dataclass
class Match:
    """The matcher's answer: the chosen cache (if any), how it was chosen, the ranking.

    ``lease`` is set when an automatic cache was created: the caller must build it
    (or release the lease, which leaves the cache to be marked Failed).
    """

    cache: ImageCache | None
    reason: str
    ranking: list[Candidate] = field(default_factory=list)
    created: bool = False
    lease: BuildLease | None = None
    warnings: tuple[str, ...] = ()


def _split(ref: str) -> tuple[str, str]:
    """(registry/repository, tag-or-digest) of a reference, normalised: a digest
    wins over a tag beside it, since the digest is what gets pulled."""
    r = reference.parse(ref)
    return r.name, r.identifier


def score(entry: Entry, wanted: list[tuple[str, str]]) -> Candidate:
    """How well a cache's images cover the wanted ones."""
    repositories = {name for name, _ in entry.keys}
    exact = sum(1 for w in wanted if w in entry.keys)
    same_repo = sum(1 for w in wanted if w not in entry.keys and w[0] in repositories)
    return Candidate(entry, exact, same_repo)


def rank(entries: Iterable[Entry], request: MatchRequest) -> list[Candidate]:
    """The entries big enough for the storage that hold at least one wanted repository,
    best first: the ranking rules over caches already in memory (the caller chooses
    which: the matcher's are the Ready ones, and it ranks them in SQL, ``rank_index``)."""
    wanted = list(dict.fromkeys(_split(i) for i in request.images))
    candidates = [score(e, wanted) for e in entries if e.size_gib >= request.storage_gib]
    candidates = [c for c in candidates if c.exact or c.same_repository]
    # Best degree, then the least size beyond the request, then newest; the name last,
    # so that equals come out in the same order every time.
    candidates.sort(key=lambda c: c.entry.name)
    candidates.sort(key=lambda c: c.entry.created, reverse=True)
    candidates.sort(key=lambda c: c.entry.size_gib - request.storage_gib)
    candidates.sort(key=lambda c: c.degree, reverse=True)
    return candidates


def rank_index(caches: Caches, request: MatchRequest, limit: int = RANKING_LIMIT) -> list[Candidate]:
    """``rank`` over every Ready cache of a home, done by SQLite on the records' match
    index (the same rules, written in SQL in ``builder.records``): the best ``limit``,
    without loading a record (what keeps a match among 10,000 caches in milliseconds)."""
    wanted = list(dict.fromkeys(_split(i) for i in request.images))
    return [Candidate(Entry(r.name, r.id, r.size_gib, r.created), r.exact, r.held - r.exact)
            for r in caches.ranked(wanted, request.storage_gib, limit)]


class _NotReady(Exception):
    """A ranked cache that left Ready (or was deleted) before it could be taken."""


class Matcher:
    """Answers match requests over the caches of one imc home."""

    def __init__(self, caches: Caches) -> None:
        self.caches = caches

    def best(self, request: MatchRequest) -> Match:
        """The cache for ``request``, by the rules in this module's docstring."""
        if request.storage_gib < 0:
            raise ValidationError(f"storage: {request.storage_gib} GiB is negative")
        for text in request.images:
            reference.parse(text)
        warnings = list(request.warnings)
        if request.cache_id:
            return self._explicit(request, warnings)
        if not request.images:
            raise ValidationError("a match needs at least one image, or a cache id")
        ranking: list[Candidate] = []
        for _ in range(3):  # the index is read outside the write that takes the winner
            ranking = rank_index(self.caches, request)
            for candidate in ranking:
                try:
                    cache = self._take(candidate.entry.name)
                except _NotReady:
                    continue  # changed since the index was read: the next one is as good as it gets
                reason = (f"{candidate.exact} of {len(request.images)} images with the same version, "
                          f"{candidate.same_repository} with the same repository; {cache.spec.size_gib} GiB for "
                          f"{request.storage_gib} GiB of storage")
                return Match(cache, reason, ranking, warnings=tuple(warnings))
            if not ranking:
                break
        if not request.auto_match:
            size = f" of at least {request.storage_gib} GiB" if request.storage_gib else ""
            return Match(None, f"no Ready cache{size} holds the repository of any requested image", ranking,
                         warnings=tuple(warnings))
        return self._auto_create(request, warnings)

    def _take(self, name: str) -> ImageCache:
        """Mark a cache used, if it is still Ready: the index was read outside this
        transaction, and a cache may have started an update or been deleted since."""
        try:
            return self.caches.take(name)
        except CacheStateError:
            raise _NotReady("no longer Ready") from None
        except NotFoundLocalError:
            raise _NotReady("deleted") from None

    def _explicit(self, request: MatchRequest, warnings: list[str]) -> Match:
        try:
            cache = self.caches.by_id(request.cache_id)  # type: ignore[arg-type]
        except NotFoundLocalError:
            raise NotFoundLocalError(f"image cache id {request.cache_id} does not exist") from None
        if cache.phase != READY:
            raise CacheStateError(f"image cache {cache.name} ({cache.id}) is {cache.phase}, not Ready")
        if cache.spec.size_gib < request.storage_gib:
            # The documentation asks of a named cache only that it be Ready; the pod's
            # storage then exceeds the cache, which the user should hear about.
            warnings.append(f"image cache {cache.name} ({cache.id}) is {cache.spec.size_gib} GiB, less than "
                            f"the {request.storage_gib} GiB of storage requested: used as named")
        keys = match_keys(cache)
        missing = [i for i in request.images if _split(i) not in keys]
        if missing:
            warnings.append(f"image cache {cache.name} ({cache.id}) does not hold {', '.join(missing)}: "
                            "these are pulled from the registry")
        try:
            cache = self.caches.take(cache.name)  # a CacheStateError if it left Ready since
        except NotFoundLocalError:
            raise CacheStateError(f"image cache {cache.name} ({cache.id}) is deleted, not Ready") from None
        return Match(cache, f"explicit cache id {cache.id}", warnings=tuple(warnings))

    def _auto_create(self, request: MatchRequest, warnings: list[str]) -> Match:
        if not request.instance_id:
            raise ValidationError("auto-match found no cache and needs an instance id to name the automatic one "
                                  "(--instance-id, or the pod's name)")
        name = AUTO_PREFIX + request.instance_id
        try:
            validate_name(name)
        except ValidationError:
            raise ValidationError(f"instance id {request.instance_id!r} does not make a valid cache name {name!r}: "
                                  f"lowercase letters, digits and '-', at most {63 - len(AUTO_PREFIX)} "
                                  "characters") from None
        size = min(SIZE_DEFAULT + request.storage_gib, SIZE_MAX)
        if size < request.storage_gib:
            warnings.append(f"{request.storage_gib} GiB of storage is more than the largest cache "
                            f"({SIZE_MAX} GiB): the automatic cache is {SIZE_MAX} GiB")
        try:
            existing = self.caches.get(name)
        except NotFoundLocalError:
            pass
        else:
            raise CacheStateError(f"automatic image cache {name} already exists ({existing.phase}) and does not "
                                  "match this request; delete it or use another instance id")
        spec = CacheSpec(images=list(request.images), image_pull_secrets=list(request.pull_secrets),
                         size_gib=size, plain_http=list(request.plain_http), insecure=list(request.insecure))
        cache, lease = self.caches.create(name, spec, auto=True, instance_id=request.instance_id)
        return Match(cache, f"no Ready cache matched: created the automatic cache {name} ({size} GiB)",
                     created=True, lease=lease, warnings=tuple(warnings))


# -- requests from Kubernetes objects ------------------------------------------------------


def request_from_pod(obj: Any, instance_id: str | None = None) -> MatchRequest:
    """A match request from a Pod, a Deployment or another object with a pod template
    (StatefulSet, DaemonSet, ReplicaSet, Job; a CronJob's job template).

    Takes the images of containers and init containers, the pod's ephemeral storage
    (each container's ``ephemeral-storage``, the larger of request and limit; summed over
    the containers, which run together, against the largest init container, which runs
    alone, as Kubernetes counts a pod's resources), and the pod (template) annotations:
    ``eci-image-cache`` and ``eci-image-snapshot-id``, and the registry lists used to
    build an automatic cache. ``imagePullPolicy: Always`` is reported: it makes the
    runtime ask the registry anyway, defeating the cache.
    """
    if not isinstance(obj, dict):
        raise ValidationError("the document is not an object (want a Pod or Deployment)")
    kind = obj.get("kind")
    top = _mapping(obj.get("metadata"), "metadata")
    if kind == "Pod":
        metadata, spec = top, _mapping(obj.get("spec"), "spec")
        where = "spec"
    else:
        template, where = _pod_template(obj)
        metadata = _mapping(template.get("metadata"), f"{where}.metadata")
        spec = _mapping(template.get("spec"), f"{where}.spec")
        where += ".spec"
    init = _containers(spec, "initContainers", where)
    regular = _containers(spec, "containers", where)
    if not regular:
        raise ValidationError(f"{where}.containers: the pod has no containers")
    images: list[str] = []
    seen: set[tuple[str, str]] = set()
    warnings = []
    storage: dict[str, list[int]] = {"initContainers": [], "containers": []}
    for section, c, path in [*init, *regular]:
        image = c.get("image")
        label = c.get("name") or path
        if not isinstance(image, str) or not image.strip():
            raise ValidationError(f"{path}: container {label} has no image")
        try:
            key = _split(image)
        except ValidationError as e:
            raise ValidationError(f"{path}.image: {e.message}") from None
        if key not in seen:
            seen.add(key)
            images.append(image)
        policy = c.get("imagePullPolicy")
        if policy == "Always":
            warnings.append(f"container {label}: imagePullPolicy Always asks the registry on every start and "
                            "defeats the cache; use IfNotPresent")
        elif policy is None and key[1] == "latest":
            warnings.append(f"container {label}: image {image} is :latest with no imagePullPolicy, which "
                            "Kubernetes takes as Always and defeats the cache; set IfNotPresent")
        storage[section].append(_container_storage(c, path))
    total = max(sum(storage["containers"]), max(storage["initContainers"], default=0))
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    auto = _bool(annotations, ANNOTATION_AUTO)
    cache_id = annotations.get(ANNOTATION_SNAPSHOT)
    if cache_id is not None and (not isinstance(cache_id, str) or not cache_id.strip()):
        raise ValidationError(f"annotation {ANNOTATION_SNAPSHOT}: want an image cache id (imc-…), got {cache_id!r}")
    plain_http = sorted(parse_endpoint_list(_string(annotations, A_PLAIN_HTTP)))
    insecure = sorted(parse_endpoint_list(_string(annotations, A_INSECURE)))
    instance = instance_id or metadata.get("name") or top.get("name")
    return MatchRequest(tuple(images), total, cache_id.strip() if cache_id else None, auto, instance,
                        tuple(warnings), tuple(plain_http), tuple(insecure),
                        _pull_secrets(spec, top.get("namespace"), where))


def _pull_secrets(spec: dict[str, Any], namespace: Any, where: str) -> tuple[str, ...]:
    """The pod's ``imagePullSecrets`` (``[{name: …}]``) as ``namespace:name`` in the
    object's namespace (``default`` when it names none), for the automatic cache."""
    entries = spec.get("imagePullSecrets") or []
    if not isinstance(entries, list):
        raise ValidationError(f"{where}.imagePullSecrets: want a list of {{name: …}}")
    refs = []
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise ValidationError(f"{where}.imagePullSecrets[{i}]: want {{name: SECRET}}")
        ref = f"{namespace or 'default'}:{name}"
        SecretStore.split_name(ref)
        refs.append(ref)
    return tuple(dict.fromkeys(refs))


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(f"{where}: want a mapping, got {type(value).__name__}")
    return value


def _pod_template(obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The pod template of a workload object, and where it sits."""
    spec = obj.get("spec")
    if isinstance(spec, dict):
        if isinstance(spec.get("template"), dict):
            return spec["template"], "spec.template"
        job = spec.get("jobTemplate")
        if isinstance(job, dict) and isinstance(job.get("spec"), dict) and isinstance(job["spec"].get("template"), dict):
            return job["spec"]["template"], "spec.jobTemplate.spec.template"
    raise ValidationError(f"kind {obj.get('kind')!r} has no pod template: want a Pod, or a workload with "
                          "spec.template (Deployment, StatefulSet, DaemonSet, Job, …)")


def _containers(spec: dict[str, Any], key: str, where: str) -> list[tuple[str, dict[str, Any], str]]:
    value = spec.get(key) or []
    if not isinstance(value, list):
        raise ValidationError(f"{where}.{key}: want a list of containers")
    out = []
    for i, c in enumerate(value):
        if not isinstance(c, dict):
            raise ValidationError(f"{where}.{key}[{i}]: want a container (a mapping)")
        out.append((key, c, f"{where}.{key}[{i}]"))
    return out


def _container_storage(c: dict[str, Any], path: str) -> int:
    resources = _mapping(c.get("resources"), f"{path}.resources")
    most = 0
    for section in ("requests", "limits"):
        value = _mapping(resources.get(section), f"{path}.resources.{section}").get("ephemeral-storage")
        if value is not None:
            most = max(most, _gib(value, f"{path}.resources.{section}.ephemeral-storage"))
    return most


def _string(annotations: dict[str, Any], key: str) -> str:
    value = annotations.get(key, "")
    if not isinstance(value, str):
        raise ValidationError(f"annotation {key}: values must be strings, got {value!r}")
    return value


def _bool(annotations: dict[str, Any], key: str) -> bool:
    value = annotations.get(key)
    if value is None:
        return False
    text = str(value).strip().lower()  # an unquoted YAML true arrives as a bool
    if text not in ("true", "false"):
        raise ValidationError(f'annotation {key}: want "true" or "false", got {value!r}')
    return text == "true"


# A Kubernetes quantity: a decimal number, then a binary or decimal SI suffix or an
# exponent (resource.Quantity's grammar; 'm' is milli).
_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?\Z")
_UNITS = {None: 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
          "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_MAX_BYTES = 2**63 - 1  # what a Kubernetes quantity can hold


def _gib(quantity: Any, where: str = "ephemeral-storage") -> int:
    """A Kubernetes quantity (``30Gi``, ``500M``, ``1e9``, ``21474836480``) in whole
    GiB, rounded up: storage is asked for in bytes but caches are sized in GiB."""
    return -(-quantity_bytes(quantity, where) // GIB)


def quantity_bytes(quantity: Any, where: str) -> int:
    """A Kubernetes quantity (``200G``, ``30Gi``, ``500M``, ``1e9``) in whole bytes,
    rounded up: how imc reads sizes (a pod's storage, ``auto_max_bytes``)."""
    if isinstance(quantity, bool) or not isinstance(quantity, int | float | str):
        raise ValidationError(f"{where}: {quantity!r} is not a quantity (e.g. 30Gi)")
    text = str(quantity).strip()
    m = _QUANTITY.match(text)
    if not m:
        raise ValidationError(f"{where}: {quantity!r} is not a quantity (e.g. 30Gi, 500M, 1e9)")
    number, suffix = m.groups()
    try:
        if suffix and suffix not in _UNITS:  # an exponent, e.g. 1e9
            exponent = int(suffix[1:])
            if abs(exponent) > 30:
                raise ValidationError(f"{where}: {quantity!r} is out of range")
            value = Decimal(number).scaleb(exponent)
        else:
            value = Decimal(number) * _UNITS[suffix]
    except InvalidOperation:
        raise ValidationError(f"{where}: {quantity!r} is not a quantity (e.g. 30Gi)") from None
    if value < 0:
        raise ValidationError(f"{where}: {quantity!r} is negative")
    if value > _MAX_BYTES:
        raise ValidationError(f"{where}: {quantity!r} is out of range")
    return int(value.to_integral_value(rounding=ROUND_CEILING))
