"""Before routing: how many tokens a request will use, and the most it can cost."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import ModelSpec
from gateway.inbound import InboundRequest
from gateway.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class Estimate:
    """Token expectations of one request, from the gateway's own tokenizer."""

    prompt_tokens: int
    max_output_tokens: int  # the most it may produce (all choices)
    expected_output_tokens: int  # what routing plans for
    exact: bool  # False when the tokenizer fell back to a character estimate

    @property
    def max_total_tokens(self) -> int:
        return self.prompt_tokens + self.max_output_tokens


class Estimator:
    """Counts prompt tokens with the app's tokenizer; built once per app."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def estimate(self, inbound: InboundRequest, model: ModelSpec) -> Estimate:
        prompt = self.tokenizer.count_prompt(inbound.body)
        if inbound.endpoint == "embeddings":
            return Estimate(prompt, 0, 0, self.tokenizer.exact)
        per_choice = inbound.max_tokens or model.expected_output_tokens
        expected = min(per_choice, model.expected_output_tokens)
        return Estimate(
            prompt_tokens=prompt,
            max_output_tokens=per_choice * inbound.n,
            expected_output_tokens=expected * inbound.n,
            exact=self.tokenizer.exact,
        )
