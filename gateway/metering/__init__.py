"""Metering: usage read from the upstream's answer (or counted), priced, and written to the ledger.

`usage` parses what the upstream reports, `counting` and `tokenizer` count what it does
not, `meter` prices an attempt in the one cost vocabulary, `ledger/` keeps the row.
"""
