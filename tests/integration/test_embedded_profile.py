"""The embedded default's simulated GPU workers run the profile its policy gives each GPU."""

from __future__ import annotations

from gateway.cli.launch import default_policy_text
from gateway.cli.serve import start_simulated
from gateway.config import parse_config
from loadtest.sim.worker import WORKER


async def test_embedded_workers_run_the_configured_profile() -> None:
    config, runners, _ = await start_simulated(parse_config(default_policy_text()))
    try:
        workers = [r.app[WORKER] for r in runners if WORKER in r.app]
        assert len(workers) == 2
        for name, sim in zip(("gpu-a", "gpu-b"), workers, strict=True):
            gpu = config.backend(name).gpu
            assert gpu is not None and gpu.profile.name == "llama-3.1-8b-h100"
            assert sim.opts.profile == gpu.profile
            assert sim.scheduler.profile.name == "llama-3.1-8b-h100"
            assert sim.scheduler.max_batch == gpu.profile.max_batch
            assert sim.scheduler.profile.decode_tokens_per_s(50) == 8018
    finally:
        for r in runners:
            await r.cleanup()
