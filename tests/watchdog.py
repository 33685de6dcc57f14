"""A per-test watchdog for the ledger's and the key masker's test files.

A broken ledger writer (a mutant, or a real bug) leaves its caller waiting forever, and a
broken key masker can loop; the watchdog ends the process after `seconds` of one test
instead, printing every thread's stack, so mutmut and CI see a failure in seconds rather
than waiting out their own timeouts (~165 s a mutant). A test that needs longer re-arms it with its own
`faulthandler.dump_traceback_later`.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Callable, Iterator

import pytest


def watchdog_after(seconds: float) -> Callable[[], Iterator[None]]:
    """An autouse fixture ending the process after `seconds` of any one test in the module
    that assigns it (`watchdog = watchdog_after(20)`)."""

    @pytest.fixture(autouse=True)
    def watchdog() -> Iterator[None]:
        faulthandler.dump_traceback_later(seconds, exit=True)
        yield
        faulthandler.cancel_dump_traceback_later()

    return watchdog
