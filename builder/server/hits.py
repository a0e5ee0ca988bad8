"""Hits on caches, counted in memory and written to the records in batches.

Every manifest or blob ``imc serve`` answers from a cache is a hit. Writing each one
would be a database transaction per request; instead hits are counted here and
written (``Caches.mark_used``: ``lastUsedTime`` and ``hitCount``) at most once a
``every`` seconds per cache, by whoever calls ``flush`` (the server, periodically,
and on shutdown, so no count is lost across a restart). A cache's first hit after a
quiet spell is due at once, so its use is on record within one flush period.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from builder.caches import Caches
from builder.errors import ImcError, NotFoundLocalError

EVERY = 60.0
"""Seconds between writes of one cache's hits."""
log = logging.getLogger(__name__)


@dataclass
class _Pending:
    hits: int
    last: dt.datetime


class Hits:
    """Unwritten hits per cache, and when each cache's were last written."""

    def __init__(self, caches: Caches, clock: Callable[[], dt.datetime] | None = None,
                 every: float = EVERY) -> None:
        self.caches = caches
        self.clock = clock or caches.clock
        self.every = dt.timedelta(seconds=every)
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._written: dict[str, dt.datetime] = {}

    def hit(self, cache: str) -> None:
        """Count one hit on ``cache``, now; nothing is written here."""
        now = self.clock()
        with self._lock:
            pending = self._pending.get(cache)
            if pending is None:
                self._pending[cache] = _Pending(1, now)
            else:
                pending.hits += 1
                pending.last = max(pending.last, now)

    def pending(self) -> dict[str, int]:
        """Hits not written yet, per cache."""
        with self._lock:
            return {name: p.hits for name, p in self._pending.items()}

    def flush(self, everything: bool = False) -> int:
        """Write the hits of every cache whose last write is ``every`` ago or more (with
        ``everything``, of every cache: shutdown); returns how many caches were written.
        Hits that cannot be written now stay counted for the next flush; those of a
        cache that no longer exists are dropped."""
        now = self.clock()
        with self._lock:
            due = {name: p for name, p in self._pending.items()
                   if everything or name not in self._written or now - self._written[name] >= self.every}
            for name in due:
                del self._pending[name]
                self._written[name] = now
        written = 0
        for name, pending in due.items():
            try:
                self.caches.mark_used(name, pending.hits, pending.last)
                written += 1
            except NotFoundLocalError:
                pass
            except ImcError as e:
                log.warning("cannot record %d hits on image cache %s yet: %s", pending.hits, name, e.message)
                with self._lock:
                    again = self._pending.setdefault(name, _Pending(0, pending.last))
                    again.hits += pending.hits
                    again.last = max(again.last, pending.last)
        return written
