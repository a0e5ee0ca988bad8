"""A settable clock for ``Caches`` (and what else takes one): it reads ``now``, which
the test moves, so expiry, retention and last-use times are known."""

from __future__ import annotations

import datetime as dt

START = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self, now: dt.datetime = START) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now
