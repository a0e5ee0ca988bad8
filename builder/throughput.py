"""The transfer rate this home's recent pulls measured: what a plan's time estimate divides by.

Each pull that fetched bytes from a registry adds one sample (bytes, seconds); the
rate is the sum of the bytes over the sum of the seconds of the last ``RECENT``
samples, so a large pull weighs more than a manifest-sized one, and an old network
stops counting after a few pulls. Samples go to one small file under the home's
metadata; a sample lost to two pulls ending at once costs nothing but precision.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from builder.home import Home
from builder.store import write_atomic

RECENT = 20
"""Samples kept: enough to smooth one slow pull, few enough to follow a new network."""


@dataclass(frozen=True)
class Sample:
    """One pull's registry transfer: ``bytes`` fetched in ``seconds`` of wall time, at ``at`` (Unix time)."""

    bytes: int
    seconds: float
    at: float


class TransferLog:
    """The recent transfer samples of one home."""

    def __init__(self, home: Path | Home) -> None:
        self.path = Home(home).transfers

    def samples(self) -> list[Sample]:
        """The samples kept, oldest first; a missing or unreadable file holds none."""
        try:
            raw = json.loads(self.path.read_bytes())
            return [Sample(int(s["bytes"]), float(s["seconds"]), float(s["at"])) for s in raw["samples"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def record(self, nbytes: int, seconds: float) -> None:
        """Add a pull's transfer; pulls that fetched nothing say nothing about the network.
        Never raises for the file: a statistic must not fail the pull it measured."""
        if nbytes <= 0 or seconds <= 0:
            return
        kept = [*self.samples(), Sample(nbytes, seconds, time.time())][-RECENT:]
        doc = {"samples": [{"bytes": s.bytes, "seconds": round(s.seconds, 6), "at": round(s.at, 3)} for s in kept]}
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(doc).encode())

    def rate(self) -> float | None:
        """Bytes per second over the recent samples, or None when no pull has been measured."""
        samples = self.samples()
        seconds = sum(s.seconds for s in samples)
        return sum(s.bytes for s in samples) / seconds if samples and seconds > 0 else None
