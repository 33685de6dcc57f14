"""Scale-out through Redis: exact limits across processes, shared backend state, and the outage policy.

Two entry points; everything else is in the submodules:

- `attach_shared_state(spec, admission=..., live=..., keys=..., ...)`: called once per
  app after its runtime is built; swaps the admission's store for the Redis-backed
  one and starts sharing backend state. Returns a `SharedHandle` to close.
- `make_limit_store(spec)`: only the Redis-backed `LimitStore` (start/close it yourself).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
from prometheus_client import CollectorRegistry

from gateway.admission import Admission, LimitStore
from gateway.config import RedisSpec
from gateway.keys import KeyStore
from gateway.ledger.reports import spend_by_tenant
from gateway.ledger.rows import LedgerStore
from gateway.live import LiveState
from gateway.shared.outage import (
    FailoverLimitStore,
    Reseed,
    SharedMetrics,
    SharedStateUnavailable,
)
from gateway.shared.redis_limits import RedisLimitStore, connect
from gateway.shared.redis_state import SNAPSHOT_TTL_MS, SharedState

__all__ = [
    "FailoverLimitStore",
    "SharedHandle",
    "SharedState",
    "SharedStateUnavailable",
    "attach_shared_state",
    "ledger_reseed",
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
        await self.limits.redis.client.aclose()


def ledger_reseed(admission: Admission, ledger: LedgerStore) -> Reseed:
    """Rebuild Redis's counters from what the ledger says each tenant spent."""

    async def reseed(target: LimitStore) -> None:
        spend = await spend_by_tenant(ledger, time.time())
        # A throwaway Admission over `target` reuses the one definition of the counter keys.
        await Admission(admission.limits, target).seed(spend)

    return reseed


def make_limit_store(
    spec: RedisSpec,
    *,
    registry: CollectorRegistry | None = None,
    reseed: Reseed | None = None,
) -> FailoverLimitStore:
    """The Redis-backed LimitStore with the configured outage policy (not yet started)."""
    client = connect(spec)
    return FailoverLimitStore(
        RedisLimitStore(client, spec.key_prefix),
        spec.on_outage,
        reseed=reseed,
        metrics=SharedMetrics(registry),
    )


async def attach_shared_state(
    spec: RedisSpec,
    *,
    admission: Admission,
    live: LiveState,
    keys: KeyStore | None,
    registry: CollectorRegistry | None = None,
    ledger: LedgerStore | None = None,
) -> SharedHandle:
    """Put `admission` on Redis-shared counters and start sharing `live` and `keys` state.

    Call after the ledger is started (a Redis without counters is rebuilt from it).
    Never fails because Redis is down: the outage policy applies until it answers.
    """
    reseed = ledger_reseed(admission, ledger) if ledger is not None else None
    limits = make_limit_store(spec, registry=registry, reseed=reseed)
    await limits.start()
    admission.store = limits
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
