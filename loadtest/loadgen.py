"""The load generator engine: closed loop (fixed concurrency) and open loop (Poisson arrivals).

`run_load(config)` sends precomputed chat-completion requests to one OpenAI-compatible endpoint
following a schedule, and returns one `RequestRecord` per request plus the run's metadata.
Open-loop latency counts from each request's scheduled start, so a slow server or a busy client
cannot hide queueing (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import platform
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from loadtest.rawhttp import RawClient, request_head
from loadtest.results import RequestRecord
from loadtest.schedule import (
    Distribution,
    Schedule,
    burst_times,
    concurrency_changes,
    poisson_arrivals,
)
from loadtest.usage_api import fetch_usage
from loadtest.wire import AiohttpClient, Client, ResponseReader, Target

_perf = time.perf_counter

# Common English words that are one token each in cl100k/o200k: N words ~ N prompt tokens.
_WORD_TEXT = (
    "the of and to in is it that for on was with as at by be this have from or one had not but "
    "what all were when we there can an your which their said if do will each about how up out "
    "them then she many some so these would other into has more her two like him see time could "
    "no make than first been its who now people my made over did down only way find use may water "
    "long little very after words called just where most know get through back much before go "
    "good new write our used me man too any day same right look think also around another came "
    "come work three word must because does part even place well such here take why things help "
    "put years different away again off went old number great tell men say small every found "
    "still between name should home big give air line set own under read last never us left end "
    "along while might next sound below saw something thought both few those always looked show "
    "large often together asked house world going want school important until form food keep"
)


class UrlError(ValueError):
    """The target URL is malformed or not allowed."""


def parse_target(url: str, allow_remote: bool = False) -> Target:
    """Chat-completions endpoint for `url` (a base like http://h:p, .../v1 or the full path).

    Refuses anything but loopback addresses unless `allow_remote`: load tests must not leave the
    machine by accident.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlError(f"{url!r}: need an http:// or https:// URL with a host")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path = (path if path.endswith("/v1") else path + "/v1") + "/chat/completions"
    if not allow_remote and not is_loopback(host):
        raise UrlError(f"{host} is not a loopback address; pass --allow-remote to load it")
    return Target(parts.scheme, host, port, path)


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8 / ::1 literals; names other than localhost are not."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """Everything that shapes a run. `keys` are tenant API keys used round-robin."""

    url: str
    schedule: Schedule
    mode: Literal["closed", "open"] = "closed"
    max_requests: int | None = None
    duration: float | None = None
    stream_ratio: float = 0.0
    prompt_tokens: Distribution = field(default_factory=lambda: Distribution("const", 128))
    max_tokens: Distribution = field(default_factory=lambda: Distribution("const", 64))
    model: str = "default"
    keys: tuple[str, ...] = ()
    seed: int = 0
    timeout: float = 60.0
    client: Literal["auto", "raw", "aiohttp"] = "auto"
    max_connections: int = 1024
    body_pool: int = 256
    extra_body: dict[str, Any] = field(default_factory=dict)
    allow_remote: bool = False
    usage_key: str | None = None

    @property
    def time_bound(self) -> float:
        """Seconds after which no new request starts."""
        return self.duration if self.duration is not None else self.schedule.duration


@dataclass(frozen=True, slots=True)
class Prepared:
    """Precomputed request bodies; request n uses body n % len(bodies), tenant n % len(tenants)."""

    bodies: list[bytes]
    streams: list[bool]
    tenants: list[str]


def make_prompt(n_tokens: int, rng: random.Random) -> str:
    """A prompt of about `n_tokens` tokens."""
    words = _WORD_TEXT.split()
    return " ".join(rng.choice(words) for _ in range(n_tokens))


def prepare(cfg: LoadConfig) -> Prepared:
    """Draw the body pool from the seeded distributions."""
    rng = random.Random(cfg.seed)
    bodies, streams = [], []
    for _ in range(max(1, cfg.body_pool)):
        stream = rng.random() < cfg.stream_ratio
        prompt = make_prompt(cfg.prompt_tokens.sample(rng), rng)
        body: dict[str, Any] = {
            "model": cfg.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": cfg.max_tokens.sample(rng),
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(cfg.extra_body)
        bodies.append(orjson.dumps(body))
        streams.append(stream)
    tenants = [f"t{i}" for i in range(len(cfg.keys))] or ["t0"]
    return Prepared(bodies, streams, tenants)


def _mask(key: str) -> str:
    return key[:4] + "…" + key[-4:] if len(key) > 12 else "…"


@dataclass(slots=True)
class Progress:
    """Live counters, read by the progress display."""

    started: int = 0
    done: int = 0
    errors: int = 0
    inflight: int = 0
    elapsed: float = 0.0
    total: float = 0.0


@dataclass(frozen=True, slots=True)
class RunOutput:
    """What a run produced."""

    meta: dict[str, Any]
    records: list[RequestRecord]


def make_client(cfg: LoadConfig, target: Target, prep: Prepared) -> Client:
    """The raw HTTP/1.1 client for http://, aiohttp for https:// or when asked."""
    limit = cfg.max_connections
    if cfg.mode == "closed":
        limit = max(1, round(cfg.schedule.max_level)) + cfg.schedule.burst_total
    keys: list[str | None] = list(cfg.keys) or [None]
    use_raw = cfg.client == "raw" or (cfg.client == "auto" and target.scheme == "http")
    if use_raw:
        if target.scheme != "http":
            raise UrlError("the raw client speaks plain http only; use --client aiohttp")
        heads = [request_head(target, k) for k in keys]
        return RawClient(target, heads, prep.bodies, limit, cfg.timeout)
    return AiohttpClient(target, keys, prep.bodies, limit, cfg.timeout)


class _Run:
    """State of one run; lives only inside `run_load`."""

    def __init__(self, cfg: LoadConfig, client: Client, prep: Prepared, progress: Progress) -> None:
        self.cfg = cfg
        self.client = client
        self.prep = prep
        self.progress = progress
        self.records: list[RequestRecord] = []
        self.next_n = 0
        self.t0 = 0.0
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def take(self, check_time: bool = True) -> int | None:
        """Index of the next request, or None when the count or time bound is reached."""
        if self.stop.is_set():
            return None
        if check_time and _perf() - self.t0 >= self.cfg.time_bound:
            self.stop.set()
            return None
        cap = self.cfg.max_requests
        if cap is not None and self.next_n >= cap:
            self.stop.set()
            return None
        n = self.next_n
        self.next_n += 1
        return n

    async def one(self, n: int, scheduled: float) -> None:
        prep = self.prep
        i = n % len(prep.bodies)
        k = n % len(prep.tenants)
        now = _perf()
        if now < scheduled:
            # Loop timers are coarse (uvloop: 1 ms) and may fire early: count from the send.
            scheduled = now
        rec = RequestRecord(
            start=scheduled - self.t0, stream=prep.streams[i], tenant=prep.tenants[k]
        )
        rec.lag = now - scheduled
        p = self.progress
        p.started += 1
        p.inflight += 1
        await self.client.request(i, k, ResponseReader(rec, scheduled, self.t0))
        p.inflight -= 1
        p.done += 1
        if rec.error is not None or not 200 <= rec.status < 300:
            p.errors += 1
        self.records.append(rec)

    def spawn(self, n: int, scheduled: float) -> None:
        task = asyncio.get_running_loop().create_task(self.one(n, scheduled))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def sleep_until(self, t: float) -> bool:
        """Sleep until run offset `t`; False if the run was stopped meanwhile."""
        delay = self.t0 + t - _perf()
        if delay > 0.05:
            # Long waits must end early when the count bound or a signal stops the run.
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
            except TimeoutError:
                return True
            return False
        if delay > 0:
            # Short waits (open-loop gaps) are hot: a plain sleep costs far less than wait_for.
            await asyncio.sleep(delay)
        return not self.stop.is_set()

    async def bursts(self) -> None:
        for t, count in burst_times(self.cfg.schedule):
            # A burst at the schedule's end (or a schedule of bursts only) still fires.
            if t > self.cfg.time_bound or not await self.sleep_until(t):
                return
            now = _perf()
            for _ in range(count):
                n = self.take(check_time=False)
                if n is None:
                    return
                self.spawn(n, now)

    async def closed_loop(self) -> None:
        changes = concurrency_changes(self.cfg.schedule)
        width = max((lvl for _, lvl in changes), default=0)
        level = 0
        wake = asyncio.Event()

        async def worker(idx: int) -> None:
            while not self.stop.is_set():
                if idx >= level:
                    ev = wake
                    await ev.wait()
                    continue
                n = self.take()
                if n is None:
                    return
                await self.one(n, _perf())

        workers = [asyncio.create_task(worker(i)) for i in range(width)]
        bursts = asyncio.create_task(self.bursts())
        for t, lvl in changes:
            if t >= self.cfg.time_bound or not await self.sleep_until(t):
                break
            level = lvl
            wake.set()
            wake = asyncio.Event()
        await self.sleep_until(self.cfg.time_bound)
        await bursts
        self.stop.set()
        wake.set()
        await asyncio.gather(*workers)

    async def open_loop(self) -> None:
        bursts = asyncio.create_task(self.bursts())
        rng = random.Random(self.cfg.seed + 1)
        bound = self.cfg.time_bound
        behind = 0
        for t in poisson_arrivals(self.cfg.schedule, rng):
            if t >= bound:
                break
            if self.t0 + t > _perf():
                behind = 0
                if not await self.sleep_until(t):
                    break
            else:
                # Running late: send at once, but yield now and then so responses get read.
                behind += 1
                if behind % 64 == 0:
                    await asyncio.sleep(0)
            # Arrivals are already inside the time bound; a late dispatch must still send them.
            n = self.take(check_time=False)
            if n is None:
                break
            self.spawn(n, self.t0 + t)
        await self.sleep_until(bound)
        await bursts
        self.stop.set()


def machine_info() -> dict[str, Any]:
    """Where the run happened (for reproducibility)."""
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }


async def run_load(
    cfg: LoadConfig,
    progress: Progress | None = None,
    usage: bool = True,
    on_start: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
) -> RunOutput:
    """Run the load described by `cfg`; returns metadata and one record per request."""
    target = parse_target(cfg.url, cfg.allow_remote)
    prep = prepare(cfg)
    progress = progress or Progress()
    progress.total = cfg.time_bound
    client = make_client(cfg, target, prep)
    usage_key = cfg.usage_key or (cfg.keys[0] if cfg.keys else None)
    usage_before = await fetch_usage(target.origin, usage_key) if usage else None
    run = _Run(cfg, client, prep, progress)
    if stop is not None:
        run.stop = stop  # lets the caller end the run early (Ctrl-C) and keep what was measured
    started_at = datetime.now(UTC)
    run.t0 = _perf()
    cpu0 = time.process_time()
    if on_start is not None:
        on_start()
    try:
        if cfg.mode == "closed":
            await run.closed_loop()
        else:
            await run.open_loop()
        # Let in-flight requests finish; each has its own deadline, this is a backstop.
        if run.tasks:
            await asyncio.wait(set(run.tasks), timeout=cfg.timeout + 1.0)
        for task in list(run.tasks):
            task.cancel()
    finally:
        await client.close()
    wall = _perf() - run.t0
    cpu = time.process_time() - cpu0
    usage_after = await fetch_usage(target.origin, usage_key) if usage else None
    extra: dict[str, Any] = {}
    if usage_after is not None and usage_after.get("status") == 200:
        # neogate filters its ledger by time: this run's usage and its measured pricing
        # sheet (per backend and batch size) without other runs mixed in.
        since = f"since={started_at.timestamp():.3f}"
        extra["usage_run"] = await fetch_usage(target.origin, usage_key, f"by=backend&{since}")
        extra["pricing_measured"] = await fetch_usage(
            target.origin, usage_key, f"report=pricing&{since}"
        )
    meta: dict[str, Any] = {
        "tool": "neogate-loadtest",
        "format": 1,
        "started_at": started_at.isoformat(timespec="seconds"),
        "url": target.url,
        "mode": cfg.mode,
        "schedule": str(cfg.schedule),
        "max_requests": cfg.max_requests,
        "duration": cfg.time_bound,
        "stream_ratio": cfg.stream_ratio,
        "prompt_tokens": str(cfg.prompt_tokens),
        "max_tokens": str(cfg.max_tokens),
        "model": cfg.model,
        "tenants": {t: _mask(k) for t, k in zip(prep.tenants, cfg.keys, strict=False)},
        "seed": cfg.seed,
        "client": type(client).__name__,
        "timeout": cfg.timeout,
        "wall_s": wall,
        "client_cpu_s": cpu,
        "machine": machine_info(),
    }
    if usage:
        meta["usage_before"] = usage_before
        meta["usage_after"] = usage_after
        meta.update(extra)
    run.records.sort(key=lambda r: r.start)
    return RunOutput(meta, run.records)
