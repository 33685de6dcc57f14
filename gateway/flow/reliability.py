"""Reliability wiring: breaker, retry budget, gate and hedge settings from the config, and the shared instances.

`settings_from(config)` is pure: `config.reliability` plus every backend's
`max_concurrency` and the gateway's `max_inflight` become the frozen configs of
the building blocks (`gateway.state.breaker`, `retry_budget`, `backpressure`,
`hedging`). `Reliability` holds the live retry budget and gate of one app and
applies a reloaded config without dropping held slots. `StallGuard` is the
client side of back-pressure: a client that stops reading is cut, not buffered for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import GatewayConfig
from gateway.flow.attempt import ForwardOptions
from gateway.flow.backpressure import Gate, GateConfig, GateState
from gateway.flow.hedging import HedgeConfig
from gateway.flow.retry_budget import RetryBudget, RetryBudgetConfig, RetryBudgetState
from gateway.state.breaker import BreakerConfig


@dataclass(frozen=True, slots=True)
class ReliabilitySettings:
    """Everything `config.reliability` decides, as the building blocks' own configs."""

    breaker: BreakerConfig
    retry_budget: RetryBudgetConfig
    gate: GateConfig
    forward: ForwardOptions
    write_buffer_bytes: int
    drain_timeout_s: float


def settings_from(config: GatewayConfig) -> ReliabilitySettings:
    """Translate the policy file's reliability section (pure)."""
    r = config.reliability
    breaker = BreakerConfig(
        consecutive_failures=r.breaker_consecutive_failures,
        failure_rate=r.breaker_failure_rate,
        base_ejection_s=r.breaker_base_ejection_s,
        # A max below the base would be refused by BreakerConfig; the base wins.
        max_ejection_s=max(r.breaker_max_ejection_s, r.breaker_base_ejection_s),
    )
    limits = {b.name: b.max_concurrency for b in config.backends}
    gate = GateConfig(
        max_total=config.max_inflight,
        max_per_backend=max(limits.values(), default=1),
        backend_limits=limits,
        max_queue=r.max_queue,
    )
    hedge = HedgeConfig(
        enabled=r.hedge,
        delay_s=r.hedge_delay_s,
        max_attempts=max(2, r.max_attempts) if r.hedge else 2,
    )
    return ReliabilitySettings(
        breaker=breaker,
        retry_budget=RetryBudgetConfig(ratio=r.retry_budget_ratio, min_retries=r.retry_budget_min),
        gate=gate,
        forward=ForwardOptions(
            max_attempts=r.max_attempts, queue_wait_s=r.queue_wait_s, hedge=hedge
        ),
        write_buffer_bytes=r.write_buffer_bytes,
        drain_timeout_s=r.drain_timeout_s,
    )


@dataclass(frozen=True, slots=True)
class ReliabilityState:
    """What /admin and metrics show of the shared parts."""

    gate: GateState
    retry_budget: RetryBudgetState


class Reliability:
    """The retry budget and gate of one app, and the settings in force.

    Breakers live with each backend's live state (`LiveState`); their config
    is `settings.breaker`.
    """

    def __init__(
        self,
        settings: ReliabilitySettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.budget = RetryBudget(settings.retry_budget)
        self.gate = Gate(settings.gate)

    @classmethod
    def from_config(
        cls, config: GatewayConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> Reliability:
        return cls(settings_from(config), clock=clock)

    def on_request(self) -> None:
        """One client request: it earns its share of retries."""
        self.budget.on_request(self._clock())

    def try_retry(self) -> bool:
        """Spend one retry (failover or hedge) if the budget has room."""
        return self.budget.try_spend(self._clock())

    def reconfigure(self, config: GatewayConfig) -> ReliabilitySettings:
        """Apply a reloaded config: new limits for new grants; held slots stay held."""
        new = settings_from(config)
        if new.retry_budget != self.settings.retry_budget:
            self.budget = RetryBudget(new.retry_budget)
        self.gate.reconfigure(new.gate)
        self.settings = new
        return new

    def snapshot(self) -> ReliabilityState:
        return ReliabilityState(self.gate.snapshot(), self.budget.snapshot(self._clock()))
