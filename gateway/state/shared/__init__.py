"""Scale-out through Redis: exact limits across processes, shared backend state, and the outage policy.

Two entry points; everything else is in the submodules:

- `attach_shared_state(spec, ...)`: called once per process after its ledger is
  started; starts the Redis-backed limit store (the caller puts its admission on
  `handle.limits`) and starts sharing backend state. Returns a `SharedHandle` to close.
- `make_limit_store(spec)`: only the Redis-backed `LimitStore` (start/close it yourself).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from prometheus_client import CollectorRegistry

from gateway.config import RedisSpec
from gateway.state.keys import KeyStore
from gateway.state.live import LiveState
from gateway.state.shared.metrics import SharedMetrics
from gateway.state.shared.outage import FailoverLimitStore, Reseed, SharedStateUnavailable
from gateway.state.shared.redis_limits import RedisLimitStore, connect, connect_fast
from gateway.state.shared.redis_state import SNAPSHOT_TTL_MS, SharedState

__all__ = [
    "FailoverLimitStore",
    "SharedHandle",
    "SharedState",
    "SharedStateUnavailable",
    "attach_shared_state",
    "make_limit_store",
    "publish_keys_changed",
]


@dataclass
class SharedHandle:
    """What `attach_shared_state` started; `close()` it when the app stops."""

    limits: FailoverLimitStore
    state: SharedState

    def keys_changed(self) -> None:
        """Call after creating or revoking a key here: other replicas refresh at once."""
        self.state.keys_changed()

    async def close(self) -> None:
        await self.state.close()
        await self.limits.close()
        await self.limits.redis.aclose()


def make_limit_store(
    spec: RedisSpec,
    *,
    registry: CollectorRegistry | None = None,
    reseed: Reseed | None = None,
) -> FailoverLimitStore:
    """The Redis-backed LimitStore with the configured outage policy (not yet started).

    Close it with `await store.close()` and then `await store.redis.aclose()`.
    """
    client = connect(spec)
    return FailoverLimitStore(
        RedisLimitStore(client, spec.key_prefix, connect_fast(spec)),
        spec.on_outage,
        reseed=reseed,
        metrics=SharedMetrics(registry),
    )


async def attach_shared_state(
    spec: RedisSpec,
    *,
    reseed: Reseed | None,
    registry: CollectorRegistry,
    live: Callable[[], LiveState],
    keys: KeyStore,
) -> SharedHandle:
    """Start Redis-shared counters and share the process's backend and key state.

    Call once per process after the ledger is started (`reseed` rebuilds a Redis
    without counters from it), then put the admission on `handle.limits`. Never fails
    because Redis is down: the outage policy applies until it answers. Follows
    reloads: `live()` is the live state in force.
    """
    limits = make_limit_store(spec, registry=registry, reseed=reseed)
    await limits.start()
    state = SharedState(limits.redis.client, spec.key_prefix, live, keys, registry=registry)
    await state.start()
    return SharedHandle(limits, state)


async def publish_keys_changed(spec: RedisSpec) -> None:
    """For `neogate keys create|revoke` run outside any replica: make every replica refresh now."""
    client = connect(spec, timeout_s=2.0)
    try:
        now = time.time()
        update = {"k": "keys", "t": now, "o": "cli"}
        pipe = client.pipeline(transaction=False)
        pipe.publish(f"{spec.key_prefix}:state", orjson.dumps({"o": "cli", "u": [update]}))
        pipe.hset(f"{spec.key_prefix}:state:snap", "keys", orjson.dumps(update))
        pipe.pexpire(f"{spec.key_prefix}:state:snap", SNAPSHOT_TTL_MS)
        await pipe.execute()
    finally:
        await client.aclose()
