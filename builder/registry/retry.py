"""Retrying, in one place: when to try again, how long to wait, and when to stop.

Every registry operation that may be sent again (a request, a manifest read, a blob
download, an upload) runs through ``Retrier.run``, as regclient keeps all retry and
backoff in its ``reghttp``. An operation stops when an error is not temporary, when
``attempts`` failures came in a row without progress, when nothing progressed for
``stall`` seconds, or when the command's deadline passed. A download that keeps
receiving bytes is never stopped by the count of its retries. Waits between tries use
full jitter, or the registry's Retry-After when it sent one; ``backoff`` is the one
backoff function of imc.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from builder.errors import DeadlineError, DigestMismatchError, ImcError, RegistryError, TransportError

T = TypeVar("T")
RETRIED = (TransportError, RegistryError, DigestMismatchError)
"""What an operation may raise and still be tried again (if its ``retryable`` says so)."""


def backoff(failures: int, base: float, cap: float, draw: Callable[[], float] = random.random) -> float:
    """The wait before try ``failures + 1``, with full jitter: a uniform draw from 0 to
    ``base * 2^(failures-1)`` (at most ``cap``). Clients that failed together then come
    back spread over the whole window, not in lockstep as a fixed backoff would have
    them (AWS, "Exponential Backoff And Jitter"). ``draw`` gives a number in [0, 1)."""
    return draw() * min(cap, base * (2 ** (failures - 1)))


@dataclass(frozen=True)
class Deadline:
    """The moment (``time.monotonic()``) by which a command must be done, and the
    ``seconds`` it was given, for the message."""

    at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: attempts in a row without progress, backoff, timeouts
    (connect, read), the longest wait without progress (``stall``) and the deadline."""

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0
    max_retry_after: float = 60.0
    timeout: tuple[float, float] = (10.0, 60.0)
    stall: float = 120.0
    deadline: Deadline | None = None

    def until(self, seconds: float | None) -> RetryPolicy:
        """This policy with a deadline ``seconds`` from now (None: no deadline)."""
        return replace(self, deadline=None if seconds is None else Deadline.after(seconds))


def temporary(error: Exception) -> bool:
    """The default test for trying again: the error says asking again may help."""
    return bool(getattr(error, "temporary", False))


class Retrier:
    """Runs operations under a ``RetryPolicy``; ``sleep`` and ``clock`` are injectable."""

    def __init__(self, policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._sleep = sleep
        self._clock = clock

    def run(
        self,
        op: Callable[[tuple[float, float]], T],
        retryable: Callable[[Exception], bool] = temporary,
        progress: Callable[[], int] | None = None,
    ) -> T:
        """Call ``op(timeout)`` until it returns or must give up (raising its last error).

        ``timeout`` is the (connect, read) pair for this try: the policy's, shortened so
        that a silent server is noticed before the stall limit or the deadline. ``progress``
        reports how far the operation got (bytes held); a try that moved it on starts a
        fresh count of failures and a fresh stall clock.
        """
        policy = self.policy
        failures = 0
        reached = progress() if progress else 0
        moved = self._clock()
        while True:
            now = self._clock()
            try:
                return op(self._timeout(now, moved))
            except RETRIED as e:
                if not retryable(e):
                    raise
                now = self._clock()
                if progress is not None and progress() > reached:
                    reached, moved, failures = progress(), now, 0
                failures += 1
                if failures >= policy.attempts or now - moved >= policy.stall:
                    raise
                retry_after = getattr(e, "retry_after", None)
                delay = (min(retry_after, policy.max_retry_after) if retry_after is not None
                         else backoff(failures, policy.backoff, policy.max_backoff))
                if policy.deadline is not None and now + delay >= policy.deadline.at:
                    raise self._past_deadline(e) from None
                self._sleep(delay)

    def check_deadline(self, doing: str) -> None:
        """Raise ``DeadlineError`` if the deadline passed: for an operation that is
        still receiving (slowly) and so never fails on its own."""
        deadline = self.policy.deadline
        if deadline is not None and self._clock() >= deadline.at:
            raise DeadlineError(f"{doing}; gave up: the {deadline.seconds:g} s deadline passed")

    def _timeout(self, now: float, moved: float) -> tuple[float, float]:
        connect, read = self.policy.timeout
        read = min(read, max(self.policy.stall - (now - moved), 0.0))
        deadline = self.policy.deadline
        if deadline is not None:
            self.check_deadline("the registry was not done")
            left = deadline.at - now
            connect, read = min(connect, left), min(read, left)
        return connect, max(read, 0.001)

    def _past_deadline(self, error: ImcError) -> DeadlineError:
        assert self.policy.deadline is not None
        return DeadlineError(f"{error.message}; gave up: the {self.policy.deadline.seconds:g} s deadline passed")
