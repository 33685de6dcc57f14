"""The request flow, in the order a request meets it.

estimate -> admission -> routing -> forward (hedging, retry_budget, breaker,
reliability) -> relay; `proxy` strings the stages together for one request, and
`backpressure` bounds the whole.
"""
