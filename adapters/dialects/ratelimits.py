"""Rate-limit headers as each provider means them -> `Headroom` (pure; the clock is passed in).

OpenAI, Nebius, generic  x-ratelimit-{limit,remaining,reset}-{requests,tokens}, per minute;
                         resets as durations ("7.66s", "12ms")
Groq                     the same names, but the *-requests headers are requests per DAY
                         (its per-minute request limit is not sent); tokens per minute
Together                 x-ratelimit-limit / -remaining (requests) and x-tokenlimit-limit /
                         -remaining (tokens), per second; x-ratelimit-reset (seconds) only
                         on a 429, which carries no retry-after
Fireworks                X-Ratelimit-Limit-Tokens-Prompt / -Generated: limits only, in
                         tokens per second, enforced per minute; no remaining counts
vLLM, SGLang             none (their load comes from /metrics)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from policies.headroom import Headroom, int_or_none, parse_reset, parse_retry_after, reset_at

HeadroomReader = Callable[[Mapping[str, str], float, Headroom], Headroom]

# Fireworks' limits are tokens per second; it enforces them per minute.
_FIREWORKS_WINDOW_S = 60.0
# Together's limits are per second (`x-ratelimit-limit: 10` is its 600 requests/minute).
_TOGETHER_WINDOW_S = 1.0


def _lower(headers: Mapping[str, str], prefix: tuple[str, ...]) -> dict[str, str]:
    """Headers whose lower-cased name starts with one of `prefix`, by lower-cased name."""
    out: dict[str, str] = {}
    for k, v in headers.items():
        lk = k.lower()
        if lk.startswith(prefix):
            out[lk] = v
    return out


def openai_headroom(headers: Mapping[str, str], now: float, previous: Headroom) -> Headroom:
    """OpenAI's per-minute `x-ratelimit-*` names (OpenAI, Nebius, any generic upstream)."""
    return Headroom.from_headers(headers, now, previous)


def groq_headroom(headers: Mapping[str, str], now: float, previous: Headroom) -> Headroom:
    """Groq: tokens per minute, but requests per day, kept apart from the per-minute window."""
    h = _lower(headers, ("x-ratelimit-",))
    if not h:
        return previous
    return previous.updated(
        now,
        limit_tokens=int_or_none(h.get("x-ratelimit-limit-tokens")),
        remaining_tokens=int_or_none(h.get("x-ratelimit-remaining-tokens")),
        reset_tokens_at=reset_at(h.get("x-ratelimit-reset-tokens"), now),
        daily_limit_requests=int_or_none(h.get("x-ratelimit-limit-requests")),
        daily_remaining_requests=int_or_none(h.get("x-ratelimit-remaining-requests")),
        daily_reset_at=reset_at(h.get("x-ratelimit-reset-requests"), now),
    )


def together_headroom(headers: Mapping[str, str], now: float, previous: Headroom) -> Headroom:
    """Together: requests and tokens per second; a reset (seconds) only on a 429."""
    h = _lower(headers, ("x-ratelimit-", "x-tokenlimit-"))
    if not h:
        return previous
    reset = reset_at(h.get("x-ratelimit-reset"), now)
    return previous.updated(
        now,
        limit_requests=int_or_none(h.get("x-ratelimit-limit")),
        remaining_requests=int_or_none(h.get("x-ratelimit-remaining")),
        limit_tokens=int_or_none(h.get("x-tokenlimit-limit")),
        remaining_tokens=int_or_none(h.get("x-tokenlimit-remaining")),
        reset_requests_at=reset,
        reset_tokens_at=reset,
        window_s=_TOGETHER_WINDOW_S,
    )


def fireworks_headroom(headers: Mapping[str, str], now: float, previous: Headroom) -> Headroom:
    """Fireworks: the effective prompt and generated token limits (per second), no remaining
    counts: the gateway's own use over the enforced minute stands in (`with_own_usage`)."""
    h = _lower(headers, ("x-ratelimit-limit-tokens-",))
    prompt = int_or_none(h.get("x-ratelimit-limit-tokens-prompt"))
    generated = int_or_none(h.get("x-ratelimit-limit-tokens-generated"))
    if prompt is None and generated is None:
        return previous
    per_min = _FIREWORKS_WINDOW_S
    return previous.updated(
        now,
        limit_tokens=None if prompt is None else int(prompt * per_min),
        limit_output_tokens=None if generated is None else int(generated * per_min),
        window_s=_FIREWORKS_WINDOW_S,
    )


def no_headroom(headers: Mapping[str, str], now: float, previous: Headroom) -> Headroom:
    """Local workers send no rate-limit headers."""
    del headers, now
    return previous


def together_retry_after(headers: Mapping[str, str]) -> float | None:
    """A Together 429 says when in `x-ratelimit-reset` (seconds) and sends no retry-after."""
    found = parse_retry_after(headers)
    if found is not None:
        return found
    for k, v in headers.items():
        if k.lower() == "x-ratelimit-reset":
            try:
                return parse_reset(v)
            except ValueError:
                return None
    return None
