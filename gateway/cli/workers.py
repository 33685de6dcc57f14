"""`neogate serve --workers N`: a supervisor that forks N full gateway processes sharing one port.

The parent never runs an event loop: it resolves the listen address, holds a
bound (never listening) SO_REUSEPORT socket so the port stays ours across
worker restarts, and forks the workers. Each worker is a complete gateway that
binds the same address with SO_REUSEPORT, so the kernel spreads connections
over the workers' own accept queues. Limits and budgets hold across the workers
only through Redis (`redis:` in the policy); without it each worker counts alone.

- SIGTERM or SIGINT to the parent: it sends SIGTERM to every worker, which
  drains its in-flight requests; workers still running after the drain timeout
  (plus a grace) are killed. A second signal kills them at once.
- SIGHUP to the parent is passed to every worker (each reloads its policy).
- A worker that dies is restarted; one that dies within `min_uptime_s` of its
  start counts as failing at start, is restarted after a growing back-off, and
  after `max_quick_failures` in a row the supervisor gives up (exit status 1).
- Workers sit in their own process group (a terminal's Ctrl-C reaches only the
  parent, which drains them in order) and, on Linux, get SIGTERM if the parent
  dies without stopping them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import FrameType
from typing import TYPE_CHECKING

from gateway.config import (
    ConfigError,
    ConfigIssue,
    GatewayConfig,
    load_config,
    parse_config,
)

if TYPE_CHECKING:
    from gateway.cli.launch import ServeOptions

log = logging.getLogger("neogate.workers")

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead worker is restarted, and when the supervisor gives up."""

    min_uptime_s: float = 5.0
    max_quick_failures: int = 5
    base_backoff_s: float = 0.25
    max_backoff_s: float = 5.0
    # Killed this long after the drain timeout if a worker has still not exited.
    kill_grace_s: float = 5.0


@dataclass
class _Worker:
    index: int
    pid: int = 0
    started: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None


def serve_workers(
    opts: ServeOptions,
    run_one: Callable[[ServeOptions], int],
    policy: RestartPolicy | None = None,
) -> int:
    """Run `opts.workers` copies of `run_one` on one port until told to stop; the exit status."""
    config = _load(opts.config_path)
    host = opts.host or config.listen.host
    port = opts.port if opts.port is not None else config.listen.port
    holder = _reserve_port(host, port)
    try:
        port = holder.getsockname()[1]
        child_opts = replace(opts, host=host, port=port)
        drain_s = config.reliability.drain_timeout_s
        log.info("neogate supervisor: %d workers on http://%s:%d/v1", opts.workers, host, port)
        sup = _Supervisor(
            opts.workers,
            lambda i: run_one(replace(child_opts, worker_index=i)),
            holder,
            policy,
            drain_s,
        )
        return sup.run()
    finally:
        holder.close()


def _load(config_path: str | None) -> GatewayConfig:
    """The policy (for the listen address and drain timeout); errors surface here, once."""
    if config_path:
        # Simulated (`sim:`) backends are started by each worker; only the listen and
        # reliability sections matter here.
        return load_config(config_path, require_env=True)
    from gateway.cli.launch import default_policy_text

    return parse_config(default_policy_text(), source="<embedded default>")


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (host, port) with SO_REUSEPORT and never listen: fails early if the port is taken.

    Port 0 becomes a concrete free port every worker then shares. A socket that
    is bound but not listening receives no connections.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        issue = ConfigIssue("listen", None, f"cannot listen on {host}:{port}: {exc}")
        raise ConfigError("<listen>", [issue]) from exc
    sock.set_inheritable(False)
    return sock


class _Supervisor:
    def __init__(
        self,
        n: int,
        child_main: Callable[[int], int],
        holder: socket.socket,
        policy: RestartPolicy | None,
        drain_s: float,
    ) -> None:
        self.workers = [_Worker(i) for i in range(n)]
        self.child_main = child_main
        self.holder = holder
        self.policy = policy or RestartPolicy()
        self.drain_s = drain_s
        self.stopping = False
        self.kill_now = False
        self.pid = os.getpid()

    # --- signals (the handlers only set flags or forward) ---------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            self.kill_now = True
        self.stopping = True

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._signal_all(signal.SIGHUP)

    def run(self) -> int:
        old = {
            sig: signal.signal(sig, handler)
            for sig, handler in (
                (signal.SIGTERM, self._on_stop),
                (signal.SIGINT, self._on_stop),
                (signal.SIGHUP, self._on_hup),
            )
        }
        try:
            for w in self.workers:
                self._spawn(w)
            status = self._watch()
            self._drain()
            return status
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _watch(self) -> int:
        while not self.stopping:
            self._reap(time.monotonic())
            for w in self.workers:
                if w.quick_failures > self.policy.max_quick_failures:
                    log.error(
                        "worker %d failed %d times within %.0f s of starting: giving up",
                        w.index,
                        w.quick_failures,
                        self.policy.min_uptime_s,
                    )
                    return 1
                if w.pid == 0 and w.restart_at is not None and time.monotonic() >= w.restart_at:
                    self._spawn(w)
            time.sleep(_POLL_S)
        return 0

    def _reap(self, now: float) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = next((w for w in self.workers if w.pid == pid), None)
            if w is None:
                continue
            w.pid = 0
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                continue
            p = self.policy
            if now - w.started < p.min_uptime_s:
                w.quick_failures += 1
                delay = min(p.max_backoff_s, p.base_backoff_s * 2 ** (w.quick_failures - 1))
            else:
                w.quick_failures = 0
                delay = 0.0
            w.restart_at = now + delay
            log.warning(
                "worker %d (pid %d) exited with %s; restarting in %.2f s",
                w.index,
                pid,
                f"signal {-code}" if code < 0 else f"status {code}",
                delay,
            )

    def _spawn(self, w: _Worker) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            os._exit(self._child(w.index))
        w.pid, w.started, w.restart_at = pid, time.monotonic(), None
        log.info("worker %d started (pid %d)", w.index, pid)

    def _child(self, index: int) -> int:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.setpgid(0, 0)
            self.holder.close()
            _die_with_parent(self.pid)
            code = self.child_main(index)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
        return code

    def _signal_all(self, sig: signal.Signals) -> None:
        for w in self.workers:
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)

    def _drain(self) -> None:
        """SIGTERM every worker; each drains; kill what is left after the drain timeout."""
        log.info("neogate supervisor: stopping %d workers", sum(1 for w in self.workers if w.pid))
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_s + self.policy.kill_grace_s
        while any(w.pid for w in self.workers):
            if self.kill_now or time.monotonic() >= deadline:
                log.warning("killing workers that did not stop in time")
                self._signal_all(signal.SIGKILL)
                self.kill_now = False
                deadline = float("inf")
            self._reap(time.monotonic())
            time.sleep(_POLL_S)
        log.info("neogate supervisor: all workers stopped")


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker if the supervisor dies without stopping it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
