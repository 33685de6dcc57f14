"""The counting pool: inline when small, on its worker thread when big, estimated when too big."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.metering.counting import CountingPool

pytestmark = pytest.mark.asyncio


def _where() -> str:
    return threading.current_thread().name


async def test_small_inputs_are_counted_inline() -> None:
    pool = CountingPool(inline_bytes=100)
    try:
        assert await pool.run(_where, 100, lambda: "estimate") == threading.current_thread().name
        assert pool.offloaded == 0
    finally:
        pool.close()


async def test_big_inputs_are_counted_on_the_worker() -> None:
    pool = CountingPool(inline_bytes=100)
    try:
        where = await pool.run(_where, 101, lambda: "estimate")
        assert where.startswith("neogate-count")
        assert (pool.offloaded, pool.queued_bytes) == (1, 0)
    finally:
        pool.close()


async def test_too_big_or_too_much_queued_is_estimated_not_counted() -> None:
    pool = CountingPool(inline_bytes=10, max_count_bytes=1000, max_queued_bytes=1500)
    release = threading.Event()
    try:
        assert await pool.run(_where, 1001, lambda: "estimate") == "estimate"
        # One 1,000-byte count holds the worker; a second would pass the queue bound.
        first = asyncio.ensure_future(pool.run(lambda: release.wait(5), 1000, lambda: False))
        await asyncio.sleep(0.05)
        assert pool.queued_bytes == 1000
        assert await pool.run(_where, 600, lambda: "estimate") == "estimate"
        release.set()
        assert await first is True
        assert pool.estimated == 2 and pool.queued_bytes == 0
    finally:
        release.set()
        pool.close()


async def test_a_cancelled_caller_keeps_its_bytes_queued_until_the_count_ends() -> None:
    pool = CountingPool(inline_bytes=10)
    release = threading.Event()
    try:
        task = asyncio.ensure_future(pool.run(lambda: release.wait(5), 500, lambda: False))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.queued_bytes == 500  # still running on the worker
        release.set()
        for _ in range(100):
            if pool.queued_bytes == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.queued_bytes == 0
    finally:
        release.set()
        pool.close()
