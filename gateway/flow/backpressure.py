"""Back-pressure: at most so many requests in flight per backend and in total, then a bounded wait.

A request that finds no free slot waits in one FIFO queue for at most its wait
limit; a full queue or an expired wait raises a `GateRejected` (429
`gateway_overloaded` family) carrying a retry-after derived from how fast slots
have been freed lately. Waiters are served in arrival order among those whose
backend has room, so a saturated backend does not hold up the others.
The only clock read is the event loop's, for waits and the drain rate.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from gateway.errors import Overloaded


@dataclass(frozen=True, slots=True)
class GateConfig:
    """Concurrency limits and the queue in front of them."""

    max_total: int = 1024
    max_per_backend: int = 256
    backend_limits: Mapping[str, int] = field(default_factory=dict)  # per-backend overrides
    max_queue: int = 512  # waiters across all backends
    drain_window_s: float = 10.0  # slots freed over this long give the drain rate
    default_retry_after_s: float = 1.0  # when nothing has drained yet
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        limits = [self.max_total, self.max_per_backend, *self.backend_limits.values()]
        if min(limits) < 1 or self.max_queue < 0 or self.drain_window_s <= 0:
            raise ValueError("limits must be >= 1, max_queue >= 0, drain_window_s > 0")


@dataclass(frozen=True, slots=True)
class GateToken:
    """Proof of one held slot; give it back with `Gate.release`."""

    backend: str
    serial: int


@dataclass(frozen=True, slots=True)
class GateState:
    """What metrics and /admin show of the gate."""

    inflight_total: int
    inflight: dict[str, int]
    queued: int
    rejected_total: int


class GateRejected(Overloaded):
    """No slot: the queue was full or the wait limit passed."""

    def __init__(self, message: str, *, backend: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.backend = backend


class QueueFull(GateRejected):
    default_code = "gateway_queue_full"


class QueueTimeout(GateRejected):
    default_code = "gateway_queue_timeout"


@dataclass(slots=True, eq=False)
class _Waiter:
    backend: str
    future: asyncio.Future[GateToken]


class Gate:
    """Slots per backend and in total, with one bounded FIFO queue in front."""

    def __init__(
        self, config: GateConfig | None = None, clock: Callable[[], float] | None = None
    ) -> None:
        self._config = config or GateConfig()
        self._clock = clock or time.monotonic  # only compared with its own readings
        self._inflight: dict[str, int] = {}
        self._total = 0
        self._live: set[GateToken] = set()
        self._serial = itertools.count()
        self._queue: deque[_Waiter] = deque()
        self._drained: dict[str | None, deque[float]] = {}  # None: the total
        self._rejected = 0

    def limit(self, backend: str) -> int:
        return self._config.backend_limits.get(backend, self._config.max_per_backend)

    def inflight(self, backend: str | None = None) -> int:
        """Slots held for `backend`, or in total when None."""
        return self._total if backend is None else self._inflight.get(backend, 0)

    def try_acquire(self, backend: str) -> GateToken | None:
        """A slot now, or None; never queues (to try the next-ranked backend first)."""
        return self._grant(backend) if self._has_room(backend) else None

    async def acquire(self, backend: str, wait_s: float) -> GateToken:
        """A slot, waiting in the queue for at most `wait_s` seconds."""
        token = self.try_acquire(backend)
        if token is not None:
            return token
        if wait_s <= 0:
            raise self._reject(QueueTimeout, backend, "the gateway is at capacity")
        if len(self._queue) >= self._config.max_queue:
            raise self._reject(QueueFull, backend, "the gateway's queue is full")
        waiter = _Waiter(backend, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        try:
            async with asyncio.timeout(wait_s):
                return await waiter.future
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()  # granted just as the wait ran out
            raise self._reject(
                QueueTimeout, backend, f"no capacity freed within {wait_s:g}s"
            ) from None
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())  # granted, but the caller is gone
            raise
        finally:
            if waiter in self._queue:
                self._queue.remove(waiter)

    def release(self, token: GateToken) -> bool:
        """Give a slot back; a second release of the same token is a no-op (returns False)."""
        if token not in self._live:
            return False
        self._live.discard(token)
        self._inflight[token.backend] -= 1
        self._total -= 1
        now = self._clock()
        drained = self._drained
        for key in (token.backend, None):
            times = drained.get(key)
            if times is None:  # not setdefault: that built a deque on every release
                times = drained[key] = deque(maxlen=4096)
            times.append(now)
        if self._queue:
            self._dispatch()
        return True

    @asynccontextmanager
    async def slot(self, backend: str, wait_s: float) -> AsyncIterator[GateToken]:
        token = await self.acquire(backend, wait_s)
        try:
            yield token
        finally:
            self.release(token)

    def reconfigure(self, config: GateConfig) -> None:
        """New limits apply to new grants; held slots stay held (a reload drops nothing)."""
        self._config = config
        self._dispatch()

    def snapshot(self) -> GateState:
        return GateState(
            inflight_total=self._total,
            inflight={k: v for k, v in sorted(self._inflight.items()) if v},
            queued=len(self._queue),
            rejected_total=self._rejected,
        )

    def _has_room(self, backend: str) -> bool:
        return self._total < self._config.max_total and self._inflight.get(backend, 0) < self.limit(
            backend
        )

    def _grant(self, backend: str) -> GateToken:
        token = GateToken(backend, next(self._serial))
        self._live.add(token)
        self._inflight[backend] = self._inflight.get(backend, 0) + 1
        self._total += 1
        return token

    def _dispatch(self) -> None:
        """Hand free slots to waiters in arrival order, skipping those whose backend is full."""
        for waiter in list(self._queue):
            if self._total >= self._config.max_total:
                return
            if waiter.future.done():
                continue  # cancelled; its own `finally` removes it
            if self._has_room(waiter.backend):
                self._queue.remove(waiter)
                waiter.future.set_result(self._grant(waiter.backend))

    def _reject(self, kind: type[GateRejected], backend: str, message: str) -> GateRejected:
        self._rejected += 1
        return kind(message, backend=backend, retry_after_s=self._retry_after(backend))

    def _retry_after(self, backend: str) -> float:
        """The time the slots freed lately would take to serve everyone ahead, plus this one."""
        cfg = self._config
        per_backend_binds = self._inflight.get(backend, 0) >= self.limit(backend)
        key = backend if per_backend_binds else None
        ahead = sum(1 for w in self._queue if key is None or w.backend == backend)
        times = self._drained.get(key)
        now = self._clock()
        while times and times[0] < now - cfg.drain_window_s:
            times.popleft()
        if not times:
            return cfg.default_retry_after_s
        # A full log covers less than the window: measure over the span it does cover.
        full = len(times) == times.maxlen
        span = max(now - times[0], 1e-3) if full else cfg.drain_window_s
        rate = len(times) / span
        return min(cfg.max_retry_after_s, (ahead + 1) / rate)
