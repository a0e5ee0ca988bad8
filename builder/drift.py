"""Tag drift: whether the tags a cache was built from still point at what it holds.

A cache is a snapshot: it keeps serving the manifests its tags resolved to when it
was built, whatever the registry says later. A check asks each tagged image's registry
where the tag points now (a manifest HEAD), with the cache's own registry settings and
pull secrets (``cache_puller``: what its build resolved with), and compares that with
the digest the tag pointed at when the cache was built. That is the index's digest
when the tag named an index (the cache holds the platform's manifest from it and
records the index beside it), else the manifest's. Images pinned by digest cannot
drift and are not asked about.

What a check finds goes into the cache's record, through ``Caches``: a ``TagDrifted``
event for each new digest a tag moved to, a ``TagCurrent`` event when it points back,
and the ``Stale`` condition. An unreachable registry is not drift: it changes no
condition, and its ``DriftCheckFailed`` warning comes at most once an hour per cache
(by the caches' clock). Nothing rebuilds on its own, except a cache whose spec asks
for it (``on_drift: update``): its update goes the way ``imc cache update`` does.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from builder.build import cache_puller
from builder.caches import BuildLease, Caches
from builder.errors import ImcError, TransportError
from builder.imagecache import (
    ON_DRIFT_UPDATE,
    READY,
    STALE_CONDITION,
    UPDATE_FAILED,
    ImageCache,
    ResolvedImage,
    parse_time,
    rfc3339,
)
from builder.reference import parse as parse_reference
from builder.registry.retry import RetryPolicy

log = logging.getLogger(__name__)

CHECKED_PHASES = (READY, UPDATE_FAILED)
"""Phases whose images are settled; a cache being built resolves its tags anyway."""
WARN_EVERY = dt.timedelta(hours=1)
RETRY = RetryPolicy(attempts=2, timeout=(5.0, 30.0), stall=30.0)
"""A check is a handful of small requests: a registry that does not answer soon is down
for this round, and the next round asks again."""

PINNED, CURRENT, MOVED, FAILED = "pinned", "current", "moved", "failed"


@dataclass(frozen=True)
class TagCheck:
    """One image of a cache: the digest its tag pointed at when the cache was built
    (``resolved``) and the one it points at now (``current``; None when pinned or when
    the registry could not be asked, then ``error`` says why)."""

    image: str
    resolved: str
    current: str | None = None
    error: str | None = None
    pinned: bool = False

    @property
    def state(self) -> str:
        if self.pinned:
            return PINNED
        if self.error is not None:
            return FAILED
        return MOVED if self.current != self.resolved else CURRENT


@dataclass
class CacheCheck:
    """What checking one cache found, and what it did about it."""

    cache: str
    tags: list[TagCheck] = field(default_factory=list)
    skipped: str | None = None  # why the cache was not checked (it is being built, or failed)
    update: str | None = None  # the update the on-drift policy started, or why it could not

    @property
    def stale(self) -> bool:
        return any(t.state == MOVED for t in self.tags)

    @property
    def failed(self) -> list[TagCheck]:
        return [t for t in self.tags if t.state == FAILED]


class _Unchanged(Exception):
    """Raised inside a record transaction to leave the record as it was."""


def tag_digest(image: ResolvedImage) -> str:
    """The digest the image's tag pointed at when the cache resolved it."""
    return image.index or image.digest


class DriftCheck:
    """Checks caches for moved tags and records what it finds on them.

    ``start_build(cache, lease)`` runs an update that the on-drift policy started (in a
    detached process for the CLI, on the server's build pool for ``imc serve``);
    without it the policy is not applied.
    """

    def __init__(self, caches: Caches, start_build: Callable[[ImageCache, BuildLease], None] | None = None,
                 retry: RetryPolicy = RETRY) -> None:
        self.caches = caches
        self.start_build = start_build
        self.retry = retry

    def check(self, names: Sequence[str] = ()) -> list[CacheCheck]:
        """Check the named caches (names or ids, each looked up before any is checked),
        or every cache when none is named."""
        targets = [self.caches.find(n) for n in names] if names else self.caches.list()
        return [self.check_cache(cache) for cache in targets]

    def check_cache(self, cache: ImageCache) -> CacheCheck:
        if cache.phase not in CHECKED_PHASES:
            return CacheCheck(cache.name, skipped=f"it is {cache.phase}; a cache is checked once it is built")
        result = CacheCheck(cache.name, self._ask(cache))
        if not any(t.state != PINNED for t in result.tags):
            return result
        try:
            recorded, drifted = self._record(cache, result)
        except _Unchanged:
            recorded, drifted = cache, False
        except ImcError as e:  # deleted or rebuilt meanwhile: this round's answers are for what it was
            log.debug("drift of image cache %s not recorded: %s", cache.name, e.message)
            return result
        # A Ready stale cache updates; after a failed update, only a newer digest tries again.
        wanted = result.stale and recorded.spec.on_drift == ON_DRIFT_UPDATE and (recorded.phase == READY or drifted)
        if wanted and self.start_build is not None:
            result.update = self._update(recorded)
        return result

    def _ask(self, cache: ImageCache) -> list[TagCheck]:
        tags = []
        unusable = None
        try:
            puller = cache_puller(self.caches, cache.spec, self.retry)
        except ImcError as e:  # a pull secret the cache names is gone
            unusable = e.message
        down: dict[str, str] = {}  # endpoint -> why it could not be reached: not asked again this round
        for image in cache.images:
            ref = parse_reference(image.name)
            if ref.digest is not None:
                tags.append(TagCheck(image.name, tag_digest(image), pinned=True))
                continue
            if unusable is not None or ref.api_host in down:
                tags.append(TagCheck(image.name, tag_digest(image), error=unusable or down[ref.api_host]))
                continue
            try:
                current = puller.registry(ref.api_host).current_digest(ref.repository, ref.identifier)
            except ImcError as e:
                if isinstance(e, TransportError):
                    down[ref.api_host] = e.message
                tags.append(TagCheck(image.name, tag_digest(image), error=e.message))
                continue
            tags.append(TagCheck(image.name, tag_digest(image), str(current)))
        return tags

    def _record(self, seen: ImageCache, result: CacheCheck) -> tuple[ImageCache, bool]:
        """Write what the check found on the cache, if it is still the content that was
        checked; returns the record and whether a tag moved to a digest not reported before."""
        now = self.caches.clock()
        held = {i.name: tag_digest(i) for i in seen.images}
        drifted = False

        def apply(c: ImageCache) -> None:
            nonlocal drifted
            if c.phase not in CHECKED_PHASES or {i.name: tag_digest(i) for i in c.images} != held:
                raise _Unchanged
            before = (copy.deepcopy(c.conditions), dict(c.moved_tags), len(c.events), c.drift_warned)
            moved: dict[str, str] = {}
            for t in result.tags:
                if t.state == MOVED and t.current is not None:
                    moved[t.image] = t.current
                    if c.moved_tags.get(t.image) != t.current:
                        drifted = True
                        c.event("TagDrifted", f"{t.image}: the tag moved from {t.resolved} to {t.current}; the "
                                "cache still serves " + t.resolved, "Warning", when=now)
                        log.info("image cache %s: %s moved from %s to %s", c.name, t.image, t.resolved, t.current)
                elif t.state == FAILED and t.image in c.moved_tags:
                    moved[t.image] = c.moved_tags[t.image]  # not known to have changed: as last seen
                elif t.state == CURRENT and t.image in c.moved_tags:
                    c.event("TagCurrent", f"{t.image}: the tag points at {t.resolved} again, what the cache holds",
                            when=now)
            c.moved_tags = moved
            if moved:
                said = "; ".join(f"{image} now points at {digest}" for image, digest in sorted(moved.items()))
                tagged = sum(1 for t in result.tags if not t.pinned)
                c.set_condition(STALE_CONDITION, True, "TagDrifted",
                                f"{len(moved)} of {tagged} tags moved since the cache was built: {said}; the "
                                "cache serves what it was built from", when=now)
            elif not result.failed:
                c.set_condition(STALE_CONDITION, False, "TagsCurrent",
                                "every tag points at the digest the cache holds", when=now)
            if result.failed:
                warned = parse_time(c.drift_warned)
                if warned is None or now - warned >= WARN_EVERY:
                    c.drift_warned = rfc3339(now)
                    said = "; ".join(f"{t.image}: {t.error}" for t in result.failed)
                    n = len(result.failed)
                    c.event("DriftCheckFailed", f"cannot check {n} tag{'' if n == 1 else 's'} (the cache keeps "
                            f"serving; checked again later): {said}", "Warning", when=now)
                    log.info("image cache %s: tag drift not checked: %s", c.name, said)
            if (c.conditions, c.moved_tags, len(c.events), c.drift_warned) == before:
                raise _Unchanged

        return self.caches.change(seen.name, apply), drifted

    def _update(self, cache: ImageCache) -> str:
        """Start the update the on-drift policy asks for, the way ``imc cache update``
        would; say what happened."""
        try:
            self.caches.change(cache.name, lambda c: c.event(
                "DriftUpdate", "on-drift is update: updating the cache to the digests its tags point at now"))
            updating, lease = self.caches.update_spec(cache.name, cache.spec)
        except ImcError as e:
            log.warning("image cache %s: the on-drift update did not start: %s", cache.name, e.message)
            return f"not started: {e.message}"
        if lease is None:
            return "not started: nothing to rebuild"
        log.info("image cache %s: updating to the moved tags' digests (on-drift: update)", cache.name)
        assert self.start_build is not None
        self.start_build(updating, lease)
        return "started"
