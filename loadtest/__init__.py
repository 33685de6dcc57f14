"""Simulated backends, load generator, trace-driven policy simulator, benchmark and report scripts."""
