"""Whether a pull-through upstream may be contacted now, or is down for a while.

After a connection failure (refused, unresolvable, a connect timeout) the upstream is
taken to be down for a short window, so that a burst of client requests does not
each wait for its own connect timeout: while it is down, what is held locally is
served at once (stale) and what is not is answered 503 at once. When the window
ends, one request probes the upstream; the others keep the down answers until the
probe reports. Each failed probe doubles the window, up to a cap; any answer from
the upstream (even an error) ends the outage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

FIRST_WINDOW = 2.0
"""Seconds an upstream is left alone after its first connection failure."""
MAX_WINDOW = 30.0
"""The longest window: an upstream back after a long outage is noticed within it."""


class UpstreamState:
    """The reachability of one upstream registry; thread-safe, ``clock`` injectable."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, first: float = FIRST_WINDOW,
                 cap: float = MAX_WINDOW) -> None:
        self._clock = clock
        self._first = first
        self._cap = cap
        self._lock = threading.Lock()
        self._window = 0.0  # 0: up
        self._until = 0.0
        self._probing = False
        self.reason = ""  # the failure that made it down
        self.attempts = 0  # contacts admitted so far, probes included

    @property
    def down(self) -> bool:
        return self._window > 0

    def admit(self) -> bool:
        """Whether a request may contact the upstream now: always while it is up; once
        it is down, only one request (the probe) after the window, until it reports."""
        with self._lock:
            if self._window > 0:
                if self._probing or self._clock() < self._until:
                    return False
                self._probing = True
            self.attempts += 1
            return True

    def reached(self) -> None:
        """The upstream answered (whatever it said): it is up."""
        with self._lock:
            self._window, self._probing, self.reason = 0.0, False, ""

    def unreachable(self, reason: str) -> None:
        """A connection failure: down for the first window, or (a failed probe) for
        twice the last one, up to the cap. Other requests that failed in the same
        outage, admitted before it was known, change nothing."""
        with self._lock:
            if self._window == 0:
                self._window = self._first
            elif self._probing:
                self._window = min(self._window * 2, self._cap)
            else:
                return
            self._probing = False
            self._until = self._clock() + self._window
            self.reason = reason

    def retry_after(self) -> float:
        """Seconds until the next probe may go (0 when up, or when one may go now)."""
        with self._lock:
            return max(self._until - self._clock(), 0.0) if self._window > 0 else 0.0
