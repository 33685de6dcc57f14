"""Fixtures shared by the integration tests that start their own simulated upstreams."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.integration.faultkit import SimFactory, sim_factory


@pytest.fixture
async def sims() -> AsyncIterator[SimFactory]:
    """Start simulated workers/providers (faultkit); all are stopped at the end of the test."""
    async with sim_factory() as start:
        yield start


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """One aiohttp client session for the test."""
    async with aiohttp.ClientSession() as s:
        yield s
