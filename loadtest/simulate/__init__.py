"""Trace-driven policy simulator (`neogate simulate`)."""
