"""Retiring caches by use: which caches go, in what order, and why.

An automatic cache lives while it is used: it expires ``auto_unused_days`` after its
last use (``Caches.expiry``), and the automatic caches together stay within the
``auto_max_bytes`` budget, the least recently used going first. One used within the
last hour is never taken for the budget: a pod may be starting from it right now. A
manual cache keeps its retention; one still in use as its retention nears its end
gets one ``ExpiringSoon`` warning, so that nobody is surprised by its deletion.

These are decisions over records alone, so that ``imc gc --dry-run`` and gc itself
decide alike; ``Caches`` carries them out.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from builder.imagecache import BUILDING, FAILED, ImageCache, parse_time, rfc3339
from builder.units import human

RECENT = dt.timedelta(hours=1)
"""A cache used this recently is never deleted for the budget."""
WARN_BEFORE = dt.timedelta(days=1)
"""How long before its retention ends a cache in use is warned about, and how recent
that use must be."""
EXPIRING_SOON = "ExpiringSoon"

# Why a cache goes: its retention ended (or it failed a day ago), it went unused, or
# the automatic caches are over their byte budget.
EXPIRED, UNUSED, BUDGET = "expired", "unused", "over-budget"


@dataclass(frozen=True)
class Retirement:
    """A cache gc deletes (or, dry, would): why (``cause``, and ``reason`` in words),
    and the bytes its volume holds on disk."""

    name: str
    id: str
    cause: str
    reason: str
    bytes: int


def last_use(cache: ImageCache) -> dt.datetime:
    """When a cache was last used: its last hit or match, else its creation."""
    when = parse_time(cache.last_used or cache.created)
    assert when is not None
    return when


def footprint(cache: ImageCache) -> int:
    """The bytes a cache holds on its own: its volume on disk (blobs in the store are
    shared, and go at gc once nothing needs them)."""
    return cache.volume.content_bytes if cache.volume is not None else 0


def expired(cache: ImageCache, expire: dt.datetime, unused_days: int) -> Retirement:
    """The retirement of a cache that expired at ``expire``."""
    if cache.phase == FAILED:
        cause, reason = EXPIRED, f"failed; kept 24 hours, until {rfc3339(expire)}"
    elif cache.auto:
        cause, reason = UNUSED, (f"automatic, unused since {rfc3339(last_use(cache))}: "
                                 f"auto_unused_days ({unused_days}) ended at {rfc3339(expire)}")
    else:
        cause, reason = EXPIRED, f"retention of {cache.spec.retention_days} days ended at {rfc3339(expire)}"
    return Retirement(cache.name, cache.id, cause, reason, footprint(cache))


def over_budget(caches: Iterable[ImageCache], budget: int, now: dt.datetime) -> tuple[list[Retirement], int]:
    """The automatic caches to delete to bring theirs within ``budget`` bytes (0: no
    budget), least recently used first, skipping those used within ``RECENT`` and those
    being built; and the bytes the automatic caches hold once they are gone (still over
    the budget when nothing more may go)."""
    autos = [c for c in caches if c.auto]
    total = sum(footprint(c) for c in autos)
    if budget <= 0:
        return [], total
    out = []
    for cache in sorted(autos, key=lambda c: (last_use(c), c.name)):
        if total <= budget:
            break
        size = footprint(cache)
        if size == 0 or cache.phase in BUILDING or now - last_use(cache) < RECENT:
            continue
        used = (f"last used {cache.last_used}" if cache.last_used
                else f"never used since its creation at {cache.created}")
        out.append(Retirement(cache.name, cache.id, BUDGET,
                              f"the least recently used automatic cache ({used}); automatic caches hold "
                              f"{human(total)}, over auto_max_bytes ({human(budget)})", size))
        total -= size
    return out, total


def expiring_soon(cache: ImageCache, now: dt.datetime) -> bool:
    """Whether a manual cache still in use (within ``WARN_BEFORE``) reaches the end of
    its retention within ``WARN_BEFORE``, and has not been warned of this end yet."""
    expire = parse_time(cache.expire)
    if cache.auto or cache.phase == FAILED or expire is None or not now < expire <= now + WARN_BEFORE:
        return False
    if cache.last_used is None or now - last_use(cache) > WARN_BEFORE:
        return False
    return not any(e.reason == EXPIRING_SOON and cache.expire in e.message for e in cache.events)


def warn_expiring(cache: ImageCache, now: dt.datetime) -> bool:
    """Add the ``ExpiringSoon`` warning to ``cache`` if it is due (once per retention
    end: a new retention that ends soon again is warned of again); True if added."""
    if not expiring_soon(cache, now):
        return False
    cache.event(EXPIRING_SOON, f"retention ends at {cache.expire} and the cache was used at {cache.last_used}; "
                "extend it (imc cache update --retention-days) to keep it", "Warning", when=now)
    return True

