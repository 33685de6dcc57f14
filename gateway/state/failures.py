"""Repeated background failures, logged once per outage: the first failure, a reminder now and then, the recovery with a count.

A poller that fails every 0.5 s while a database is down must not write a
traceback each time (a 20 s PostgreSQL outage wrote 139 KB of log). A
`FailureStreak` per background loop logs the first failure of a streak as one
warning line (no traceback for the expected kinds of outage; a traceback once
for anything else), counts the rest silently, repeats one line with the count
every `remind_s` while the streak lasts, and logs the recovery with the count
and duration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

REMIND_S: Final = 300.0


class FailureStreak:
    """The failures of one repeated task, logged once per streak with a count."""

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        *,
        expected: tuple[type[BaseException], ...] = (),
        remind_s: float = REMIND_S,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._level = level
        self.what = what
        self._expected = expected
        self._remind_s = remind_s
        self._clock = clock
        self.failures = 0  # in the current streak
        self._since = 0.0
        self._reminded = 0.0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, exc: BaseException) -> None:
        """One failure: logged if it starts a streak (or a reminder is due), else counted."""
        now = self._clock()
        self.failures += 1
        if self.failures == 1:
            self._since = self._reminded = now
            # An outage of a kind we expect needs no traceback; anything else gets one, once.
            trace = not isinstance(exc, self._expected)
            self._log.log(
                self._level,
                "%s failing: %s: %s (logged once until it recovers)",
                self.what,
                type(exc).__name__,
                exc,
                exc_info=exc if trace else None,
            )
        elif now - self._reminded >= self._remind_s:
            self._reminded = now
            self._log.log(
                self._level,
                "%s still failing: %d failures in %.0fs, last %s: %s",
                self.what,
                self.failures,
                now - self._since,
                type(exc).__name__,
                exc,
            )

    def succeeded(self) -> None:
        """It works again: one line with what the streak cost."""
        if self.failures == 0:
            return
        self._log.warning(
            "%s recovered after %d failures in %.1fs",
            self.what,
            self.failures,
            self._clock() - self._since,
        )
        self.failures = 0
