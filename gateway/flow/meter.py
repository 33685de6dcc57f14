"""The request's last stage: a finished `Completion` turned into usage, cost, a ledger row,
settled budgets and metrics.

The row is committed (or durably spooled) before the request counts as
complete: callers await `Meter.finish` before the last byte goes to the client.
What it is made of (usage, counting, prices, the ledger) is in `gateway.metering`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from gateway.config import ModelSpec
from gateway.errors import BudgetExceeded, LimitExceeded
from gateway.flow.admission import Admission, AdmissionRejected, Reservation
from gateway.flow.completion import Completion
from gateway.flow.estimate import Estimate
from gateway.metering.counting import CountingPool
from gateway.metering.ledger import LedgerRow, LedgerWriter
from gateway.metering.money import UnitPrices, cost_usd, nusd_to_usd, usd_to_nusd
from gateway.metering.outcome import AttemptOutcome
from gateway.metering.prices import PricesInForce
from gateway.metering.stream_meter import StreamMeter
from gateway.metering.tokenizer import Tokenizer
from gateway.metering.usage import Usage, reconcile, usage_from_response
from gateway.metrics import GatewayMetrics
from gateway.state.live import LiveState

if TYPE_CHECKING:
    from gateway.flow.attempt import SentAttempt
    from gateway.http.auth import Tenant

log = logging.getLogger("neogate.metering")


# The tenant of rows the operator pays for (cancelled hedges). Not a valid tenant name,
# so it never meets a configured tenant, its budgets or its usage.
OPERATOR_TENANT: Final = "(operator)"


class Meter:
    """Turns finished requests into usage, cost, a ledger row, settled budgets and metrics."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        metrics: GatewayMetrics,
        ledger: LedgerWriter | None,
        admission: Admission,
        live: LiveState,
        *,
        divergence_threshold: float = 0.1,
        counting: CountingPool | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._rough = Tokenizer.estimate()
        self._counting = counting if counting is not None else CountingPool()
        self._metrics = metrics
        self.ledger = ledger
        self.admission = admission
        self._live = live
        self._threshold = divergence_threshold
        self.prices = PricesInForce(live)

    # --- before forwarding ----------------------------------------------------------

    async def reserve(self, tenant: Tenant, model: ModelSpec, estimate: Estimate) -> Reservation:
        """Hold the most this request can cost against the tenant's budgets and rate limits.

        Budgets hold the upper bound (`Estimate.budget_output_tokens`: the key's max_tokens
        cap when the request set none); the tokens-per-minute limit the request's own.
        """
        cost = self.prices.most_usd(model, estimate.prompt_tokens, estimate.budget_output_tokens)
        try:
            return await self.admission.reserve(
                tenant.name,
                estimate.max_total_tokens,
                cost,
                budget_tokens=estimate.budget_total_tokens,
            )
        except AdmissionRejected as exc:
            self._metrics.rejections.labels(exc.limit).inc()
            raise _limit_error(exc) from exc

    def tiered_prices(self, completion: Completion, usage: Usage) -> UnitPrices | None:
        """The prices of the tier the request's real prompt length reached, where that differs
        from the tier its estimate picked (same book version only: the price in force)."""
        prices, backend, model = completion.prices, completion.backend, completion.inbound.model
        if prices is None or backend is None or self._live.backends[backend].gpu is not None:
            return None
        book = self._live.prices.book
        price = book.get(backend, model)
        if price is None or not price.tiers or prices.version != str(book.version):
            return None
        real = self.prices.unit_prices(backend, model, completion.batch_seen, usage.prompt_tokens)
        return None if real is prices else real

    # --- after the answer -------------------------------------------------------------

    async def abandon(self, completion: Completion) -> None:
        """A request that never reached a backend: release what it reserved."""
        if completion.reservation is not None:
            await self.admission.release(completion.reservation)

    async def finish(
        self,
        completion: Completion,
        *,
        outcome: str,
        answer: dict[str, Any] | None = None,
        meter: StreamMeter | None = None,
        answer_bytes: int = 0,
    ) -> Usage | None:
        """Meter the attempt, commit its ledger row, settle the budget; returns the usage.

        `answer` is a buffered answer's JSON (parsed once, by the forwarder; its size
        in `answer_bytes`), `meter` a stream's; with neither, nothing was delivered and
        no row is written. Big counts run off the loop (`CountingPool`).
        """
        usage = await self._usage(completion, outcome, answer, meter, answer_bytes)
        completion.usage = usage
        if usage is not None:
            tiered = self.tiered_prices(completion, usage)
            if tiered is not None:
                completion.prices = tiered  # a long prompt's tier, known once usage is
        ended = completion.end(outcome, time.monotonic()) if completion.backend else None
        cost = Decimal(0)
        try:
            if (
                usage is not None
                and completion.backend is not None
                and completion.prices is not None
            ):
                divergent = reconcile(usage, self._threshold)
                assert ended is not None
                if self.ledger is None:  # no row to keep: only its cost, rounded as a row's
                    cost = nusd_to_usd(usd_to_nusd(cost_usd(usage, completion.prices)))
                    row = None
                else:
                    row = self._row(completion, ended, usage, divergent)
                    cost = row.cost_usd
                if divergent:
                    self._metrics.divergence.labels(completion.backend).inc()
                if row is not None and self.ledger is not None:
                    await self.ledger.record(row)
            for loser, prices, batch in completion.hedge_losers:
                if self.ledger is not None:
                    row = self._sent_row(
                        completion, loser, prices, batch, OPERATOR_TENANT, "hedge_cancelled"
                    )
                    await self.ledger.record(row)
        finally:
            # Even when no row could be written, the reservation must not stay held.
            if completion.reservation is not None:
                tokens = usage.total_tokens if usage is not None else 0
                await self.admission.settle(completion.reservation, tokens, cost)
        self._observe(completion, outcome, usage, cost)
        return usage

    async def _usage(
        self,
        completion: Completion,
        outcome: str,
        answer: dict[str, Any] | None,
        meter: StreamMeter | None,
        answer_bytes: int,
    ) -> Usage | None:
        prompt = completion.estimate.prompt_tokens
        if meter is not None:
            stream = meter
            return await self._counting.run(
                lambda: stream.finish(outcome == "ok", self._tokenizer, prompt),
                stream.kept_chars,
                lambda: stream.finish(outcome == "ok", self._rough, prompt),
            )
        if answer is None:
            return None
        body = answer
        if self._counting.fits_inline(answer_bytes):  # the common case: no closures, no hop
            return usage_from_response(
                body, tokenizer=self._tokenizer, prompt_tokens_estimate=prompt
            )
        return await self._counting.run(
            lambda: usage_from_response(
                body, tokenizer=self._tokenizer, prompt_tokens_estimate=prompt
            ),
            answer_bytes,
            lambda: usage_from_response(body, tokenizer=self._rough, prompt_tokens_estimate=prompt),
        )

    async def left_before_answer(
        self,
        completion: Completion,
        sent: list[SentAttempt],
        batch_seen: Callable[[str], int],
    ) -> None:
        """The client left while attempts were out: each had the prompt and gets a row.

        The first is the tenant's (what it asked for); a hedge beside it is the operator's.
        Nothing was delivered, so no completion tokens are charged.
        """
        if not sent:
            await self.abandon(completion)  # it never reached a backend
            return
        tokens, cost = 0, Decimal(0)
        model, prompt = completion.inbound.model, completion.estimate.prompt_tokens
        try:
            for i, out in enumerate(sorted(sent, key=lambda s: s.number)):
                batch = batch_seen(out.backend)
                prices = self.prices.unit_prices(out.backend, model, batch, prompt, prompt)
                tenant = completion.tenant if i == 0 else OPERATOR_TENANT
                row = self._sent_row(completion, out, prices, batch, tenant, "client_disconnect")
                if i == 0:
                    tokens, cost = row.prompt_tokens, row.cost_usd
                if self.ledger is not None:
                    await self.ledger.record(row)
        finally:
            if completion.reservation is not None:
                await self.admission.settle(completion.reservation, tokens, cost)

    async def broken_attempts(
        self,
        completion: Completion,
        broken: list[SentAttempt],
        batch_seen: Callable[[str], int],
    ) -> None:
        """Attempts whose answer broke mid-body (cut, stalled, not JSON): the backend did the
        work and nothing of it reached the client, so each is the operator's cost.

        The body is lost, so the row holds the prompt (estimated) and no completion.
        """
        model, prompt = completion.inbound.model, completion.estimate.prompt_tokens
        for out in broken:
            batch = batch_seen(out.backend)
            prices = self.prices.unit_prices(out.backend, model, batch, prompt, prompt)
            row = self._sent_row(completion, out, prices, batch, OPERATOR_TENANT, "upstream_cut")
            if self.ledger is not None:
                await self.ledger.record(row)

    def hedge_prices(
        self,
        losers: tuple[SentAttempt, ...],
        model: str,
        batch_seen: Callable[[str], int],
        *,
        prompt_tokens: int,
    ) -> tuple[tuple[SentAttempt, UnitPrices, int], ...]:
        """The price in force for each cancelled hedge, captured when the race ended (the
        tier its prompt of `prompt_tokens` reaches; a GPU's prefill at that prompt's length)."""
        out = []
        for loser in losers:
            batch = batch_seen(loser.backend)
            prices = self.prices.unit_prices(
                loser.backend, model, batch, prompt_tokens, prompt_tokens
            )
            out.append((loser, prices, batch))
        return tuple(out)

    def _sent_row(
        self,
        completion: Completion,
        loser: SentAttempt,
        prices: UnitPrices,
        batch: int,
        tenant: str,
        outcome: str,
    ) -> LedgerRow:
        """A row for an attempt cancelled before it answered: the prompt, nothing delivered."""
        prompt = completion.estimate.prompt_tokens
        live = self._live.backends[loser.backend]
        return LedgerRow.from_usage(
            request_id=completion.rid,
            attempt=loser.number,
            ts=time.time(),
            tenant=tenant,
            model=completion.inbound.model,
            backend=loser.backend,
            backend_model=loser.backend_model,
            usage=Usage(prompt, 0, source="estimated", counted_prompt_tokens=prompt),
            prices=prices,
            ttft_s=None,
            total_s=time.monotonic() - completion.arrived,
            stream=completion.inbound.stream,
            outcome=outcome,
            divergent=False,
            batch_size=batch if live.gpu is not None else None,
            is_local=live.spec.is_local,
            client_request_id=completion.client_request_id,
        )

    def _row(
        self, completion: Completion, ended: AttemptOutcome, usage: Usage, divergent: bool
    ) -> LedgerRow:
        assert completion.backend is not None and completion.prices is not None
        live = self._live.backends[completion.backend]
        return LedgerRow.from_usage(
            request_id=completion.rid,
            attempt=completion.attempt,
            ts=time.time(),
            tenant=completion.tenant,
            model=completion.inbound.model,
            backend=completion.backend,
            backend_model=completion.backend_model or "",
            usage=usage,
            prices=completion.prices,
            ttft_s=ended.ttft_s,
            total_s=ended.total_s,
            stream=completion.inbound.stream,
            outcome=ended.status,
            divergent=divergent,
            batch_size=completion.batch_seen if live.gpu is not None else None,
            is_local=live.spec.is_local,
            client_request_id=completion.client_request_id,
            marginal_cost_usd=self._marginal(completion),
            counterfactual=self._counterfactual(completion, usage),
        )

    @staticmethod
    def _marginal(completion: Completion) -> float | None:
        """Routing's marginal cost of the backend that served (None: not a routed candidate)."""
        cand = completion.candidate()
        return None if cand is None else cand.predicted_cost_usd

    def _counterfactual(
        self, completion: Completion, usage: Usage
    ) -> tuple[str, UnitPrices] | None:
        """The alternative routing saw (cheapest external meeting the SLO) and its prices now,
        at the tier the request's real prompt reaches."""
        decision = completion.decision
        if decision is None or decision.alternative is None:
            return None
        alt = decision.alternative
        return alt, self.prices.unit_prices(alt, completion.inbound.model, 0, usage.prompt_tokens)

    def _observe(
        self, completion: Completion, outcome: str, usage: Usage | None, cost: Decimal
    ) -> None:
        backend = completion.backend or "none"
        model = completion.inbound.model
        m = self._metrics
        m.outcome(backend, model, outcome).inc()
        route = m.route(backend, model)
        total = time.monotonic() - completion.arrived
        route.duration.observe(total)
        ttft = completion.ttft_s
        if ttft is not None:
            route.ttft.observe(ttft)
        if usage is None:
            return
        route.prompt.inc(usage.prompt_tokens)
        route.completion.inc(usage.completion_tokens)
        if usage.cached_tokens:
            route.cached.inc(usage.cached_tokens)
        if usage.reasoning_tokens:
            route.reasoning.inc(usage.reasoning_tokens)
        if cost:
            route.cost.inc(float(cost))
        if completion.inbound.stream and ttft is not None and usage.completion_tokens > 1:
            route.itl.observe((total - ttft) / (usage.completion_tokens - 1))


def _limit_error(exc: AdmissionRejected) -> LimitExceeded:
    """429 saying which limit; retry-after only where waiting helps."""
    cls = LimitExceeded if exc.limit.endswith("_per_minute") else BudgetExceeded
    waiting_helps = exc.retry_after_s is not None
    return cls(
        exc.message,
        code=exc.limit,
        retry_after_s=exc.retry_after_s,
        should_retry=waiting_helps,
    )
