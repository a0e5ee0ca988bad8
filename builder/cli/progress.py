"""Progress of pulls, builds and volume transfers on stderr, for people and for logs.

On a terminal the display is live (rich's Progress): a status line for the build
phase, an overall line with percentage, rate and time left, and one line per layer
or part with its own bar or its state. Off a terminal (a CI log) nothing is redrawn
and no escape code is written: one line per finished blob or part, and a summary
with the total and the percentage every ``SUMMARY_EVERY`` seconds and at the end.

Both renderers read the same tally, so the numbers a log shows are the ones a
terminal shows. Nothing here is called unless progress is wanted (``-q`` passes None).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from builder.pull import BlobDone, BlobProgress, BlobStarted, ImageDone, ImageResolved, PullEvent, PullPlanned
from builder.units import human

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from builder.artifact import TransferEvent
    from builder.digest import Digest
    from builder.imagecache import Event

SUMMARY_EVERY = 10.0
"""Seconds between two summaries in a log: often enough to see a pull move, rarely
enough that a long pull does not bury the blob lines."""

# Cache events the blob and image lines already say.
_SAID_BY_PULL = ("LayerFetched", "LayerReused", "ImageResolved")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Tally:
    """Bytes done of the planned total, and the rate of the bytes that moved."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.done = 0
        self.moved = 0
        self.started = time.monotonic()

    def plan(self, size: int) -> None:
        self.total = (self.total or 0) + size

    @property
    def rate(self) -> float:
        return self.moved / max(time.monotonic() - self.started, 1e-6)

    @property
    def percent(self) -> int | None:
        if self.total is None:
            return None
        return 100 if self.total == 0 else min(100, self.done * 100 // self.total)

    def summary(self, verb: str) -> str:
        """``12.0 MB of 400.0 MB (3%) fetched, 3.3 MB/s, 0:01:58 left``."""
        if self.total is None:
            return f"{human(self.done)} {verb}, {human(self.rate)}/s"
        text = f"{human(self.done)} of {human(self.total)} ({self.percent}%) {verb}, {human(self.rate)}/s"
        rate = self.rate
        if self.done < self.total and rate > 0:
            text += f", {_clock((self.total - self.done) / rate)} left"
        return text


def _origin_state(origin: str) -> str:
    if origin == "registry":
        return "done"
    return "already exists" if origin == "store" else f"reused from {origin}"


# -- logs --------------------------------------------------------------------------------


class _Lines:
    """Plain lines for a log, with a summary every ``SUMMARY_EVERY`` seconds."""

    def __init__(self, verb: str, stream: TextIO) -> None:
        self.verb = verb
        self.stream = stream
        self.tally = Tally()
        self.lock = threading.Lock()
        self.last_summary = time.monotonic()

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def maybe_summary(self) -> None:
        now = time.monotonic()
        if now - self.last_summary >= SUMMARY_EVERY:
            self.last_summary = now
            self.line(f"  {self.tally.summary(self.verb)}")

    def close(self) -> None:
        pass


class PullLines(_Lines):
    """A pull in a log: resolved images, a line per blob, summaries with the total."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__("fetched", stream)
        self.seen: set[Digest] = set()

    def __call__(self, event: PullEvent) -> None:
        with self.lock:
            t = self.tally
            if isinstance(event, ImageResolved):
                self.line(f"{event.image}: resolved {event.digest}")
            elif isinstance(event, PullPlanned):
                t.plan(event.size)
                self.line(f"{event.blobs} blobs, {human(event.size)} in total")
            elif isinstance(event, BlobStarted):
                t.done += event.offset
                if event.offset:
                    self.line(f"  resume {event.digest.short} at {human(event.offset)}")
            elif isinstance(event, BlobProgress):
                t.done += event.delta
                t.moved += event.delta
                self.maybe_summary()
            elif isinstance(event, BlobDone) and event.digest not in self.seen:
                self.seen.add(event.digest)
                if event.reused:
                    t.done += event.size
                verb = "reused " if event.reused else "fetched"
                self.line(f"  {verb} {event.digest.short}  {human(event.size):>10}  {event.media_type}")
                if t.total is not None and t.done >= t.total:
                    self.line(f"  {t.summary(self.verb)}")
            elif isinstance(event, ImageDone):
                self.line(f"{event.image}: complete")

    def cache_event(self, event: Event) -> None:
        """A cache's own steps (resolved, capacity, flash, volume) between the blob lines."""
        if event.reason in _SAID_BY_PULL:
            return
        with self.lock:
            self.line(f"[{event.reason}] {event.message}")


class TransferLines(_Lines):
    """A volume push or pull in a log: a line per part, summaries with the total."""

    def __call__(self, event: TransferEvent) -> None:
        # Loaded here: the volume commands need it, a pull does not.
        from builder.artifact import BytesMoved, PartDone, PartSkipped, TransferPlanned, Verifying

        with self.lock:
            t = self.tally
            if isinstance(event, TransferPlanned):
                t.plan(event.size)
                self.line(f"{event.parts} parts, {human(event.size)} in total")
            elif isinstance(event, BytesMoved):
                t.done += event.delta
                t.moved += event.delta
                if event.delta < 0:
                    self.line(f"  a session was lost: {human(-event.delta)} go again")
                self.maybe_summary()
            elif isinstance(event, PartDone):
                self.line(f"  {self.verb} part {event.part + 1}/{event.parts}  {human(event.size):>10}")
                self._after_part()
            elif isinstance(event, PartSkipped):
                t.done += event.size
                self.line(f"  skipped  part {event.part + 1}/{event.parts}  {human(event.size):>10}  "
                          "(already in the registry)")
                self._after_part()
            elif isinstance(event, Verifying):
                self.line(f"verifying the volume ({human(event.size)})")

    def _after_part(self) -> None:
        if self.tally.total is not None and self.tally.done >= self.tally.total:
            self.line(f"  {self.tally.summary(self.verb)}")


# -- terminals ---------------------------------------------------------------------------


def _board(stream: TextIO) -> Progress:
    """A live display: a status line above an overall row and a row per layer or part.

    Rows carry a ``kind`` field: the overall row shows percentage, rate and time
    left; a layer's row shows its bytes, or its state once nothing moves
    ("already exists", "reused", "verifying", "done").
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    class Only(ProgressColumn):
        """A column shown on the overall row only."""

        def __init__(self, inner: ProgressColumn) -> None:
            super().__init__()
            self.inner = inner

        def render(self, task: Any) -> Any:
            return self.inner.render(task) if task.fields.get("kind") == "total" else Text("")

    class Amount(ProgressColumn):
        """Bytes of total, or the layer's state."""

        def __init__(self) -> None:
            super().__init__()
            self.bytes = DownloadColumn()

        def render(self, task: Any) -> Any:
            state = task.fields.get("state")
            if not state and task.fields.get("kind") == "layer" and task.total and task.completed >= task.total:
                state = "verifying"
            return Text(state, style="cyan") if state else self.bytes.render(task)

    class Remaining(TimeRemainingColumn):
        def render(self, task: Any) -> Any:
            shown = super().render(task)
            return Text(f"{shown.plain} left", style=shown.style)

    class Board(Progress):
        status = ""

        def get_renderables(self) -> Any:
            if self.status:
                yield Text(self.status, style="bold")
            yield self.make_tasks_table(self.tasks)

    return Board(
        TextColumn("{task.description}"), BarColumn(bar_width=30), Amount(),
        Only(TaskProgressColumn()), Only(TransferSpeedColumn()), Only(Remaining()),
        console=Console(file=stream, highlight=False), refresh_per_second=8)


class _Live:
    """What the terminal renderers share: the board, its overall row, and a lock."""

    def __init__(self, stream: TextIO) -> None:
        self.board = _board(stream)
        self.lock = threading.Lock()
        self.total_row: TaskID | None = None
        self.planned = 0
        self.board.start()

    def say(self, text: str) -> None:
        """A line printed above the live display, kept in the scrollback."""
        self.board.console.print(text, markup=False, highlight=False)

    def plan(self, size: int, label: str) -> None:
        self.planned += size
        if self.total_row is None:
            self.total_row = self.board.add_task(label, total=size, kind="total")
        else:
            self.board.update(self.total_row, total=self.planned)

    def advance(self, n: int) -> None:
        if self.total_row is not None:
            self.board.advance(self.total_row, n)

    def close(self) -> None:
        self.board.stop()


class PullBoard(_Live):
    """A pull on a terminal: a row per blob with its bar, as docker pull shows it."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.rows: dict[Digest, TaskID] = {}

    def _row(self, digest: Digest, size: int) -> TaskID:
        if digest not in self.rows:
            self.rows[digest] = self.board.add_task(f"  {digest.short}", total=size, kind="layer")
        return self.rows[digest]

    def __call__(self, event: PullEvent) -> None:
        with self.lock:
            if isinstance(event, ImageResolved):
                self.say(f"{event.image}: resolved {event.digest}")
            elif isinstance(event, PullPlanned):
                self.plan(event.size, f"{event.blobs} blobs")
            elif isinstance(event, BlobStarted):
                self.board.update(self._row(event.digest, event.size), completed=event.offset)
                self.advance(event.offset)
            elif isinstance(event, BlobProgress):
                self.board.advance(self._row(event.digest, event.size), event.delta)
                self.advance(event.delta)
            elif isinstance(event, BlobDone):
                fresh = event.digest not in self.rows
                row = self._row(event.digest, event.size)
                if event.reused and fresh:
                    self.advance(event.size)
                self.board.update(row, completed=event.size, state=_origin_state(event.origin))
            elif isinstance(event, ImageDone):
                self.say(f"{event.image}: complete")

    def cache_event(self, event: Event) -> None:
        """A build's phase becomes the status line; warnings stay in the scrollback."""
        if event.reason in _SAID_BY_PULL:
            return
        with self.lock:
            self.board.status = f"[{event.reason}] {event.message}"  # type: ignore[attr-defined]
            if event.type == "Warning":
                self.say(f"[{event.reason}] {event.message}")


class TransferBoard(_Live):
    """A volume push or pull on a terminal: a row per part in flight."""

    def __init__(self, verb: str, stream: TextIO) -> None:
        super().__init__(stream)
        self.verb = verb
        self.sizes: tuple[int, ...] = ()
        self.rows: dict[int, TaskID] = {}

    def _row(self, part: int) -> TaskID:
        if part not in self.rows:
            size = self.sizes[part] if part < len(self.sizes) else None
            self.rows[part] = self.board.add_task(f"  part {part + 1}/{len(self.sizes)}", total=size, kind="layer")
        return self.rows[part]

    def _finish(self, part: int, parts: int, size: int, state: str) -> None:
        row = self.rows.pop(part, None)
        if row is not None:
            self.board.remove_task(row)
        self.say(f"  {state} part {part + 1}/{parts}  {human(size):>10}")

    def __call__(self, event: TransferEvent) -> None:
        # Loaded here: the volume commands need it, a pull does not.
        from builder.artifact import BytesMoved, PartDone, PartSkipped, TransferPlanned, Verifying

        with self.lock:
            if isinstance(event, TransferPlanned):
                self.sizes = event.sizes
                self.plan(event.size, f"{event.parts} parts")
            elif isinstance(event, BytesMoved):
                if event.part is not None:
                    self.board.advance(self._row(event.part), event.delta)
                self.advance(event.delta)
            elif isinstance(event, PartDone):
                self._finish(event.part, event.parts, event.size, f"{self.verb} ")
            elif isinstance(event, PartSkipped):
                self.advance(event.size)
                self._finish(event.part, event.parts, event.size, "skipped  ")
            elif isinstance(event, Verifying):
                self.board.status = f"verifying the volume ({human(event.size)})"  # type: ignore[attr-defined]


# -- choosing ----------------------------------------------------------------------------


@contextmanager
def pull_progress(quiet: bool, stream: TextIO | None = None) -> Iterator[PullBoard | PullLines | None]:
    """The renderer for a pull or a build: live on a terminal, lines in a log, none with ``-q``."""
    if quiet:
        yield None
        return
    stream = stream or sys.stderr
    view = PullBoard(stream) if stream.isatty() else PullLines(stream)
    try:
        yield view
    finally:
        view.close()


@contextmanager
def transfer_progress(verb: str, quiet: bool,
                      stream: TextIO | None = None) -> Iterator[TransferBoard | TransferLines | None]:
    """The renderer for a volume push (``uploaded``) or pull (``downloaded``)."""
    if quiet:
        yield None
        return
    stream = stream or sys.stderr
    view = TransferBoard(verb, stream) if stream.isatty() else TransferLines(verb, stream)
    try:
        yield view
    finally:
        view.close()
