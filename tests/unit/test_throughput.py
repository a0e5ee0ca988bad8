"""The transfer rate recent pulls measured: weighted by bytes, the last RECENT only, never failing a pull."""

from __future__ import annotations

from pathlib import Path

from builder.home import Home
from builder.throughput import RECENT, TransferLog


def test_no_pull_measured_is_an_unknown_rate(tmp_path: Path) -> None:
    log = TransferLog(tmp_path)
    assert log.rate() is None
    log.record(0, 1.0)  # a pull that fetched nothing says nothing about the network
    assert log.rate() is None and not Home(tmp_path).transfers.exists()


def test_the_rate_weighs_each_pull_by_its_bytes(tmp_path: Path) -> None:
    log = TransferLog(tmp_path)
    log.record(1_000, 1.0)
    log.record(99_000, 1.0)
    assert log.rate() == 50_000  # (1 000 + 99 000) / 2 s, not the mean of 1 000 and 99 000 per second


def test_only_the_recent_pulls_count(tmp_path: Path) -> None:
    log = TransferLog(tmp_path)
    log.record(10, 10.0)
    for _ in range(RECENT):
        log.record(1_000, 1.0)
    assert log.rate() == 1_000 and len(log.samples()) == RECENT


def test_an_unreadable_file_is_no_measurement(tmp_path: Path) -> None:
    path = Home(tmp_path).transfers
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    log = TransferLog(tmp_path)
    assert log.rate() is None
    log.record(500, 0.5)
    assert log.rate() == 1_000
