"""What every benchmark shares: commands timed side by side, peak memory, the table.

A benchmark runs imc and its peer in the same run, alternating, several times, and
reports the median of each and their ratio. Absolute times are printed for context
only; nothing here is a pass/fail assertion.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "registry-fixtures"))
IMC = [str(Path(sys.executable).parent / "imc")]


@dataclass
class Run:
    """One timed command: wall seconds, CPU seconds (user and system, its children's
    included) and peak resident memory."""

    seconds: float
    max_rss_bytes: int
    cpu_seconds: float = 0.0


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> Run:
    """Run a command to completion after flushing dirty pages (so one run's writeback
    does not slow the next); its wall time, CPU time and its own peak RSS."""
    os.sync()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "measure.py"), *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    err = proc.stderr.decode(errors="replace").rstrip()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err[-2000:]}")
    measured = json.loads(err.splitlines()[-1])
    return Run(measured["seconds"], measured["maxrss_kb"] * 1024, measured["cpu_seconds"])


@dataclass
class SideBySide:
    """Repeated runs of imc and a peer, alternating so neither always goes first."""

    name: str
    imc: list[Run] = field(default_factory=list)
    peer: list[Run] = field(default_factory=list)

    @property
    def imc_median(self) -> float:
        return statistics.median(r.seconds for r in self.imc)

    @property
    def peer_median(self) -> float:
        return statistics.median(r.seconds for r in self.peer)

    @property
    def imc_cpu_median(self) -> float:
        return statistics.median(r.cpu_seconds for r in self.imc)

    @property
    def peer_cpu_median(self) -> float:
        return statistics.median(r.cpu_seconds for r in self.peer)


def side_by_side(name: str, rounds: int, imc: Callable[[], Run], peer: Callable[[], Run],
                 reset: Callable[[], None]) -> SideBySide:
    """Alternate imc and the peer ``rounds`` times each, resetting state before each run."""
    result = SideBySide(name)
    for i in range(rounds):
        order = [(imc, result.imc), (peer, result.peer)]
        if i % 2:
            order.reverse()
        for fn, sink in order:
            reset()
            sink.append(fn())
    return result


def fresh_dir(path: Path) -> Path:
    """An empty directory at ``path``."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


class Table:
    """Rows of a markdown table, printed as they come and written at the end."""

    def __init__(self, title: str, columns: list[str]) -> None:
        self.title = title
        self.columns = columns
        self.rows: list[list[str]] = []

    def add(self, *cells: object) -> None:
        row = [str(c) for c in cells]
        self.rows.append(row)
        print("  " + " | ".join(row), flush=True)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(" --- " for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
