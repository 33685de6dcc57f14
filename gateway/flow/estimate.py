"""Before routing: how many tokens a request will use, and the most it can cost."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import ModelSpec
from gateway.http.inbound import InboundRequest
from gateway.metering.counting import CountingPool
from gateway.metering.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class Estimate:
    """Token expectations of one request, from the gateway's own tokenizer."""

    prompt_tokens: int
    max_output_tokens: int  # the most it may produce (all choices)
    expected_output_tokens: int  # what routing plans for
    exact: bool  # False when the tokenizer fell back to a character estimate
    # What budgets hold for the output when the client set no max_tokens: the key's cap
    # (None: `max_output_tokens`, which the client bounded itself).
    reserved_output_tokens: int | None = None

    @property
    def max_total_tokens(self) -> int:
        return self.prompt_tokens + self.max_output_tokens

    @property
    def budget_output_tokens(self) -> int:
        """Output tokens a budget reservation holds: an upper bound, never the expectation."""
        if self.reserved_output_tokens is None:
            return self.max_output_tokens
        return self.reserved_output_tokens

    @property
    def budget_total_tokens(self) -> int:
        return self.prompt_tokens + self.budget_output_tokens


class Estimator:
    """Counts prompt tokens with the app's tokenizer, big prompts off the loop; built once per app."""

    def __init__(self, tokenizer: Tokenizer, counting: CountingPool | None = None) -> None:
        self.tokenizer = tokenizer
        self.counting = counting if counting is not None else CountingPool()
        self._rough = Tokenizer.estimate()

    async def estimate(
        self, inbound: InboundRequest, model: ModelSpec, output_cap: int | None = None
    ) -> Estimate:
        """The request's token expectations; prompts over the counting cap are estimated.

        `output_cap` is the most output per choice this key may ask for (its max_tokens
        limit): what a request without max_tokens holds against budgets. Holding only
        the expected output let a burst of such requests overspend a budget 2.5x.
        """
        exact = [self.tokenizer.exact]
        if self.counting.fits_inline(inbound.size):
            # The common case, counted here: no closures, no hand-off.
            prompt = self.tokenizer.count_prompt(inbound.body)
        else:

            def rough() -> int:
                exact[0] = False
                return self._rough.count_prompt(inbound.body)

            prompt = await self.counting.run(
                lambda: self.tokenizer.count_prompt(inbound.body), inbound.size, rough
            )
        if inbound.endpoint == "embeddings":
            return Estimate(prompt, 0, 0, exact[0])
        per_choice = inbound.max_tokens or model.expected_output_tokens
        expected = min(per_choice, model.expected_output_tokens)
        reserved = None
        if inbound.max_tokens is None and output_cap is not None:
            reserved = max(output_cap, per_choice) * inbound.n
        return Estimate(
            prompt_tokens=prompt,
            max_output_tokens=per_choice * inbound.n,
            expected_output_tokens=expected * inbound.n,
            exact=exact[0],
            reserved_output_tokens=reserved,
        )
