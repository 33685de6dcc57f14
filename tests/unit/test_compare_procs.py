"""The side-by-side benchmark waits for idle servers before each cell."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from loadtest.compare_procs import Proc, wait_quiet


def test_wait_quiet_returns_for_idle_and_times_out_for_busy(tmp_path: Path) -> None:
    idle = Proc.start("idle", [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "i")
    busy = Proc.start("busy", [sys.executable, "-c", "while True: pass"], tmp_path / "b")
    try:
        time.sleep(0.5)  # past the interpreters' start-up
        waited = wait_quiet([idle], window_s=0.5, timeout_s=5.0)
        assert waited is not None and waited < 5.0
        assert busy.cpu_seconds() > 0.0
        assert wait_quiet([idle, busy], window_s=0.5, timeout_s=1.0) is None
    finally:
        idle.stop(grace=1.0)
        busy.stop(grace=1.0)
