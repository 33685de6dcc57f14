"""The population SLO budget: how many more misses a class can afford in its recent window.

The SLO target is a share of requests (99% of interactive requests meet their TTFT and
ITL bounds), not a promise about each one. Judging every request at its own 99% quantile
keeps the population far above the target when most requests are far from their bounds:
a local GPU then spills work it could have served. `MissBudget` keeps, per class and
fading with `tau_s`, the requests routed and the misses measured, plus the predicted miss
probabilities of local requests still in flight (not yet measured). What is left,

    budget = MISS_SHARE x routed - missed - in-flight miss probabilities,

is handed to routing (`RouteRequest.miss_budgets`): a local worker may take a request whose
predicted miss probability is above the single-request tail (`TAIL_P`) while it fits in
the budget (`policies.predict`). Measured misses replace predictions as requests finish,
and the predictions are scaled by how many misses the class's local requests measured
against how many were predicted (`calibration`): a model that is too optimistic (the 70B
pair's short answers) spends little, not a budget it cannot see.

A routed request that got no whole answer is a measured miss; one the client withdrew
before any bound had passed leaves the window (`withdraw`): what counts as which is the
gateway's (`gateway.flow.slo_budgets`) and the simulator's (`loadtest.simulate`) call.

Immutable: each event returns a new value; the clock is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The share of a class's requests the budget lets routing spend on predicted misses: half of
# the 1% a 99% target allows. The other half is kept for misses the model does not predict
# (short answers that meet a long prefill; TTFT): measured misses replace predictions only
# when requests finish. Chosen on held-out seeds 1 and 2 (`neogate simulate --suite heldout`),
# between 1% (12 of 20 cheapest at the SLO; several at 98.8-99.0%) and 0.5% (15 of 20).
MISS_SHARE = 0.005
# The window the share is kept over: counts fade with this time constant (10 minutes).
WINDOW_TAU_S = 600.0


@dataclass(frozen=True, slots=True)
class MissBudget:
    """One class's recent requests and measured misses, the expected misses of local
    requests still in flight, and how the miss model's predictions compare with what the
    class's local requests measured (`calibration`)."""

    routed: float = 0.0
    missed: float = 0.0
    at: float = 0.0
    in_flight: float = 0.0
    # The class's own finished local requests: the sum of their predicted miss
    # probabilities and their measured misses.
    predicted_local: float = 0.0
    missed_local: float = 0.0
    tau_s: float = WINDOW_TAU_S

    def _faded(self, now: float) -> MissBudget:
        if now <= self.at:
            return self
        keep = math.exp((self.at - now) / self.tau_s)
        return MissBudget(
            self.routed * keep,
            self.missed * keep,
            now,
            self.in_flight,
            self.predicted_local * keep,
            self.missed_local * keep,
            self.tau_s,
        )

    @property
    def calibration(self) -> float:
        """Measured over predicted misses of the class's local requests, (m + 1) / (p + 1):
        1 with no evidence; above 1 when the model predicts fewer misses than happen."""
        return (self.missed_local + 1.0) / (self.predicted_local + 1.0)

    def charge(self, probability: float) -> float:
        """The expected misses a local request predicted at `probability` is charged."""
        return probability * self.calibration

    # The steps below build the next value with the constructor, not `dataclasses.replace`:
    # they run on every request (count, settle, left), where replace cost ~3 us each.

    def count(self, now: float) -> MissBudget:
        """One more request of the class routed (wherever it went)."""
        b = self._faded(now)
        return MissBudget(
            b.routed + 1.0,
            b.missed,
            b.at,
            b.in_flight,
            b.predicted_local,
            b.missed_local,
            b.tau_s,
        )

    def admit(self, charge: float) -> MissBudget:
        """A local worker took a request charged this many expected misses (`charge`)."""
        if charge <= 0.0:
            return self
        return MissBudget(
            self.routed,
            self.missed,
            self.at,
            self.in_flight + charge,
            self.predicted_local,
            self.missed_local,
            self.tau_s,
        )

    def settle(
        self, now: float, charge: float, missed: bool, predicted: float | None = None
    ) -> MissBudget:
        """A request finished: its charge leaves the in-flight sum and a measured miss is
        counted. `predicted`: it was the class's own request on a local worker, predicted
        to miss with this probability (the calibration's evidence)."""
        b = self._faded(now)
        miss = 1.0 if missed else 0.0
        return MissBudget(
            b.routed,
            b.missed + miss,
            b.at,
            max(b.in_flight - max(charge, 0.0), 0.0),
            b.predicted_local + (predicted or 0.0),
            b.missed_local + (miss if predicted is not None else 0.0),
            b.tau_s,
        )

    def withdraw(self, now: float, age_s: float) -> MissBudget:
        """A request counted `age_s` ago leaves the class's population unjudged (the client
        left before any bound had passed, or asked for what no backend can serve): its
        count, faded since, comes back out. Not a miss, and not a request that met the SLO."""
        b = self._faded(now)
        weight = math.exp(-max(age_s, 0.0) / b.tau_s)
        return MissBudget(
            max(b.routed - weight, 0.0),
            b.missed,
            b.at,
            b.in_flight,
            b.predicted_local,
            b.missed_local,
            b.tau_s,
        )

    def left(self, now: float, share: float = MISS_SHARE) -> float:
        """What the class can still afford now, in predicted miss probability (the misses
        left over the calibration; never below 0). Nothing until the window holds enough
        requests for the share to allow one whole miss (1 / share of them): a budget of a
        fraction of a miss, early in a window, is spent before anything is measured."""
        # `_faded`'s arithmetic without building the faded value: asked on every request.
        keep = 1.0 if now <= self.at else math.exp((self.at - now) / self.tau_s)
        allowed = share * (self.routed * keep)
        if allowed < 1.0:
            return 0.0
        room = allowed - self.missed * keep - self.in_flight
        if room <= 0.0:
            return 0.0
        return room / ((self.missed_local * keep + 1.0) / (self.predicted_local * keep + 1.0))
