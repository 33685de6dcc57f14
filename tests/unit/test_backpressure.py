"""Back-pressure gate: in-flight limits per backend and in total, a bounded FIFO queue, typed 429s."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import Overloaded
from gateway.flow.backpressure import Gate, GateConfig, GateRejected, QueueFull, QueueTimeout


class FakeClock:
    """Stands in for loop.time in the drain-rate arithmetic only; waits still use the loop."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_limits_per_backend_and_in_total() -> None:
    gate = Gate(GateConfig(max_total=3, max_per_backend=2, backend_limits={"small": 1}))
    a1, a2 = gate.try_acquire("a"), gate.try_acquire("a")
    assert a1 is not None and a2 is not None
    assert gate.try_acquire("a") is None
    s1 = gate.try_acquire("small")
    assert s1 is not None
    assert gate.try_acquire("b") is None  # total of 3 reached
    assert (gate.inflight("a"), gate.inflight("small"), gate.inflight()) == (2, 1, 3)
    assert gate.release(s1)
    assert not gate.release(s1)  # a second release is a no-op
    assert gate.inflight() == 2
    assert gate.try_acquire("b") is not None


async def test_waiters_are_served_in_arrival_order() -> None:
    gate = Gate(GateConfig(max_total=10, max_per_backend=1))
    held = await gate.acquire("a", 1.0)
    order: list[int] = []

    async def waiter(i: int) -> None:
        async with gate.slot("a", 2.0):
            order.append(i)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
    await asyncio.sleep(0)
    assert gate.snapshot().queued == 4
    gate.release(held)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]
    assert gate.snapshot().inflight_total == 0


async def test_a_full_backend_does_not_hold_up_waiters_for_another() -> None:
    gate = Gate(GateConfig(max_total=2, max_per_backend=1))
    a = gate.try_acquire("a")
    b = gate.try_acquire("b")
    assert a is not None and b is not None
    wait_a = asyncio.create_task(gate.acquire("a", 2.0))
    wait_b = asyncio.create_task(gate.acquire("b", 2.0))
    await asyncio.sleep(0)
    gate.release(b)  # frees total room, but "a" is still at its own limit
    got_b = await asyncio.wait_for(wait_b, 1.0)
    assert got_b.backend == "b"
    assert not wait_a.done()
    gate.release(a)
    assert (await asyncio.wait_for(wait_a, 1.0)).backend == "a"


async def test_the_wait_limit_raises_a_429_with_retry_after() -> None:
    gate = Gate(GateConfig(max_total=1, default_retry_after_s=1.5))
    held = gate.try_acquire("a")
    assert held is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(QueueTimeout) as info:
        await gate.acquire("a", 0.05)
    assert loop.time() - started >= 0.05
    exc = info.value
    assert isinstance(exc, Overloaded)
    assert (exc.http_status(), exc.code, exc.backend) == (429, "gateway_queue_timeout", "a")
    assert exc.retry_after_s == 1.5  # nothing drained yet: the default
    assert exc.headers()["retry-after"] == "2"
    assert gate.snapshot().queued == 0
    assert gate.snapshot().rejected_total == 1


async def test_no_wait_means_an_immediate_rejection() -> None:
    gate = Gate(GateConfig(max_total=1))
    assert gate.try_acquire("a") is not None
    with pytest.raises(QueueTimeout):
        await gate.acquire("a", 0.0)


async def test_a_full_queue_rejects_at_once() -> None:
    gate = Gate(GateConfig(max_total=1, max_queue=1))
    held = gate.try_acquire("a")
    assert held is not None
    queued = asyncio.create_task(gate.acquire("a", 5.0))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as info:
        await gate.acquire("b", 5.0)
    assert info.value.code == "gateway_queue_full"
    gate.release(held)
    gate.release(await queued)


async def test_retry_after_follows_the_observed_drain_rate() -> None:
    clock = FakeClock()
    gate = Gate(GateConfig(max_total=100, max_per_backend=2, drain_window_s=10.0), clock=clock)
    for t in range(5):  # five slots freed in the last 10 s: 0.5 per second
        clock.now = float(t)
        tok = gate.try_acquire("a")
        assert tok is not None
        gate.release(tok)
    assert gate.try_acquire("a") is not None and gate.try_acquire("a") is not None
    with pytest.raises(GateRejected) as info:
        await gate.acquire("a", 0.0)
    assert info.value.retry_after_s == pytest.approx(2.0)  # (0 ahead + 1) / 0.5
    clock.now = 12.5  # releases at t=0,1,2 left the window: 2 in 10 s
    with pytest.raises(GateRejected) as info:
        await gate.acquire("a", 0.0)
    assert info.value.retry_after_s == pytest.approx(5.0)


async def test_a_cancelled_waiter_leaves_the_queue_and_leaks_no_slot() -> None:
    gate = Gate(GateConfig(max_total=1))
    held = gate.try_acquire("a")
    assert held is not None
    task = asyncio.create_task(gate.acquire("a", 5.0))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.snapshot().queued == 0
    gate.release(held)
    assert gate.inflight() == 0
    assert gate.try_acquire("a") is not None


async def test_a_waiter_cancelled_after_its_grant_gives_the_slot_back() -> None:
    gate = Gate(GateConfig(max_total=1))
    held = gate.try_acquire("a")
    assert held is not None
    task = asyncio.create_task(gate.acquire("a", 5.0))
    await asyncio.sleep(0)
    gate.release(held)  # grants the slot to the waiter, which has not run yet
    assert gate.inflight() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.inflight() == 0


async def test_the_slot_is_released_when_the_body_raises() -> None:
    gate = Gate(GateConfig(max_total=1))
    with pytest.raises(RuntimeError):
        async with gate.slot("a", 0.1):
            assert gate.inflight("a") == 1
            raise RuntimeError("boom")
    assert gate.inflight() == 0


async def test_raising_the_limits_on_reload_serves_waiters() -> None:
    gate = Gate(GateConfig(max_total=1))
    held = gate.try_acquire("a")
    assert held is not None
    task = asyncio.create_task(gate.acquire("a", 5.0))
    await asyncio.sleep(0)
    gate.reconfigure(GateConfig(max_total=2))
    tok = await asyncio.wait_for(task, 1.0)
    assert gate.snapshot().inflight == {"a": 2}
    gate.reconfigure(GateConfig(max_total=1))  # lowering keeps held slots held
    assert gate.release(tok) and gate.release(held)
    assert gate.inflight() == 0
