"""Simulated backends speaking the OpenAI wire format: a GPU worker, an external provider, a static upstream."""
