"""Soak run: minutes of mixed traffic through a `neogate serve` process while faults come and go.

    python -m loadtest.soak --minutes 3

Simulated backends run in this process (two GPU workers, one provider); the
gateway runs as a subprocess so its RSS is its own (read from /proc). Over the
run: a worker fails outright, the provider rate-limits, the config is reloaded
(POST /admin/reload, then SIGHUP), a worker hangs on some requests, and
clients that never read their stream come and go beside a slow reader.
The report: client-visible errors by cause and phase, RSS over time, upstream
versus client traffic, and ledger rows against the completions clients received.
Loopback only; bounded by --minutes.

It ends with a verdict and exits 1 when any check fails: an error a client saw that the
schedule does not explain (the only expected ones are 429/503 on the 70B model, whose
one backend rate-limits, while it does and for a cool-down after), a completion without
its ledger row, a gateway that does not exit 0 on SIGTERM, a Traceback in its log, or
a fault step that could not be applied.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web

from loadtest.compare_procs import Proc, free_port
from loadtest.sim.common import start_site
from loadtest.sim.provider import ProviderOptions, create_provider_app
from loadtest.sim.worker import WorkerOptions, create_worker_app

ADMIN_KEY = "ng-soak-admin-key-0123456789"
SMALL, LARGE = "llama-3.1-8b", "llama-3.3-70b"
# (start, end) as fractions of the run, and what happens then.
SCHEDULE = (
    (0.15, 0.35, "gpu-a down"),
    (0.40, 0.60, "provider rate-limits"),
    (0.65, 0.80, "gpu-b hangs 30%"),
)
RELOAD_AT, HUP_AT = 0.50, 0.70
WARMUP = 0.15
# Rate limits on the 70B model's only backend are expected from the phase's start until
# this long after its end (the backend's cool-down and the provider's minute window).
RATE_LIMIT_COOLDOWN_S = 65.0


@dataclass
class Tally:
    """Everything the clients saw."""

    sent: int = 0
    ok: set[str] = field(default_factory=set)  # request ids with a complete answer
    partial: set[str] = field(default_factory=set)  # streams that ended in an error event
    errors: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (phase, model, cause)
    unexpected: Counter[tuple[str, str, str]] = field(
        default_factory=Counter
    )  # the same, unexplained
    cuts: list[tuple[float, bool]] = field(default_factory=list)  # (s until closed, got [DONE])
    slow_reads: list[str] = field(default_factory=list)
    rss: list[tuple[float, int, str]] = field(default_factory=list)  # (t, kB, phase)
    events: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, minutes: float, concurrency: int, out: Path, seed: int) -> None:
        self.duration = minutes * 60.0
        self.concurrency = concurrency
        self.out = out
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.sims: dict[str, str] = {}
        self.runners: list[web.AppRunner] = []
        self.t0 = 0.0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = out / "soak.yaml"
        self.proc: Proc | None = None
        self.missing_rows = 0
        self.tracebacks = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def phase(self) -> str:
        f = self.now() / self.duration
        active = [name for a, b, name in SCHEDULE if a <= f < b]
        if f < WARMUP:
            return "warm-up"
        return " + ".join(active) or "normal"

    # --- setup --------------------------------------------------------------------------------

    async def start_sims(self) -> None:
        for name, seed in (("gpu-a", 1), ("gpu-b", 2)):
            runner, port = await start_site(
                create_worker_app(WorkerOptions(seed=seed, time_scale=0.5))
            )
            self.runners.append(runner)
            self.sims[name] = f"http://127.0.0.1:{port}"
        runner, port = await start_site(create_provider_app(ProviderOptions(time_scale=0.5)))
        self.runners.append(runner)
        self.sims["provider"] = f"http://127.0.0.1:{port}"

    def write_config(self, groq_out_price: float) -> None:
        quick = {"first_byte_s": 2.0, "idle_s": 3.0, "total_s": 60.0}
        gpu = {"price_per_hour": 2.95, "mode": "reserved"}
        worker_models = {SMALL: "meta-llama/Llama-3.1-8B-Instruct"}
        policy = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "auth": {"allow_anonymous_on_loopback": True},
            "backends": [
                {"name": n, "kind": "vllm", "base_url": self.sims[n] + "/v1", "models": worker_models,
                 "gpu": gpu, "max_concurrency": 32, "timeouts": quick}
                for n in ("gpu-a", "gpu-b")
            ]
            + [
                {"name": "sim-groq", "kind": "groq", "base_url": self.sims["provider"] + "/v1",
                 "models": {SMALL: "llama-3.1-8b-instant", LARGE: "llama-3.3-70b-versatile"},
                 "price": {"input_per_million": 0.05, "output_per_million": groq_out_price},
                 "timeouts": quick},
            ],
            "models": [
                {"name": SMALL, "backends": ["gpu-a", "gpu-b", "sim-groq"]},
                {"name": LARGE, "backends": ["sim-groq"]},
            ],
            "ledger": {"kind": "sqlite", "path": str(self.out / "ledger.db"),
                       "spool_path": str(self.out / "ledger.spool")},
            "tokenizer": {"source": "bpe-openai"},
            "reliability": {"breaker_base_ejection_s": 2.0},
        }  # fmt: skip
        self.config_path.write_text(yaml.safe_dump(policy, sort_keys=False))

    async def start_gateway(self) -> None:
        import sys

        self.proc = Proc.start(
            "neogate",
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path)],
            self.out / "gateway.log",
            env={"NEOGATE_ADMIN_KEY": ADMIN_KEY, "NEOGATE_SECRET": "soak-secret"},
        )
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                try:
                    async with s.get(self.url + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if not self.proc.alive():
                    break
                await asyncio.sleep(0.2)
        raise RuntimeError("the gateway did not become ready\n" + self.proc.tail())

    # --- load -----------------------------------------------------------------------------------

    async def client(self, session: aiohttp.ClientSession, worker: int) -> None:
        n = 0
        while self.now() < self.duration:
            n += 1
            rid = f"soak-{worker:02d}-{n:06d}"
            model = LARGE if self.rng.random() < 0.1 else SMALL
            stream = self.rng.random() < 0.5
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"soak request {rid}: tell me a story"}],
                "max_tokens": self.rng.randint(8, 48),
                "stream": stream,
            }
            self.tally.sent += 1
            phase = self.phase()
            started = self.now()
            cause = await self._one(session, rid, body, stream)
            if cause is not None:
                self.tally.errors[(phase, model, cause)] += 1
                if not self.expected(model, cause, started):
                    self.tally.unexpected[(phase, model, cause)] += 1
                if cause.startswith(("429", "503")):
                    await asyncio.sleep(0.2)  # what a polite client does
            await asyncio.sleep(self.rng.uniform(0.01, 0.05))

    def expected(self, model: str, cause: str, started: float) -> bool:
        """Whether the schedule explains this error: only rate limits on the 70B model (its one
        backend rate-limits); every fault on the 8B model must be absorbed by failover."""
        begin, end = SCHEDULE[1][0] * self.duration, SCHEDULE[1][1] * self.duration
        return (
            model == LARGE
            and cause.startswith(("429", "503"))
            and begin <= started <= end + RATE_LIMIT_COOLDOWN_S
        )

    async def _one(
        self, session: aiohttp.ClientSession, rid: str, body: dict[str, Any], stream: bool
    ) -> str | None:
        try:
            async with session.post(
                self.url + "/v1/chat/completions",
                json=body,
                headers={"x-request-id": rid},
                timeout=aiohttp.ClientTimeout(total=90),
            ) as r:
                raw = await r.read()
                if r.status != 200:
                    return f"{r.status} {_code(raw)}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"client {type(exc).__name__}"
        if not stream:
            self.tally.ok.add(rid)
            return None
        events = [e for e in raw.split(b"\n\n") if e]
        if events and events[-1] == b"data: [DONE]":
            self.tally.ok.add(rid)
            return None
        if events and events[-1].startswith(b'data: {"error"'):
            self.tally.partial.add(rid)
            return f"stream error {_code(events[-1][6:])}"
        self.tally.partial.add(rid)
        return "stream ended without [DONE]"

    async def never_reader(self) -> None:
        """A client that asks for a long stream and reads nothing; time until the gateway cuts it."""
        # ~4.6 MB from the provider at ~1,000 tokens/s: more than the kernel buffers hold.
        body = orjson.dumps(
            {"model": LARGE, "stream": True, "max_tokens": 20000, "ignore_eos": True,
             "messages": [{"role": "user", "content": "a very long story"}]}
        )  # fmt: skip
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json"
            f"\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        t = time.monotonic()
        tail = b""
        try:
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            await loop.sock_sendall(sock, head + body)
            await asyncio.sleep(30.0)  # read nothing
            while True:  # then drain what is buffered until the connection closes
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 30)
                if not chunk:
                    break
                tail = (tail + chunk)[-64:]
        except (ConnectionError, TimeoutError):
            pass
        finally:
            sock.close()
        self.tally.cuts.append((time.monotonic() - t, b"[DONE]" in tail))

    async def slow_reader(self, session: aiohttp.ClientSession) -> None:
        """A client that reads its stream slowly but steadily: it must not be cut."""
        while self.now() < self.duration - 10:
            body = {"model": SMALL, "stream": True, "max_tokens": 300, "ignore_eos": True,
                    "messages": [{"role": "user", "content": "slowly"}]}  # fmt: skip
            try:
                async with session.post(self.url + "/v1/chat/completions", json=body) as r:
                    data = b""
                    while chunk := await r.content.read(512):
                        data += chunk
                        await asyncio.sleep(0.02)
                self.tally.slow_reads.append("ok" if b"[DONE]" in data else "cut")
            except aiohttp.ClientError as exc:
                self.tally.slow_reads.append(type(exc).__name__)

    # --- faults and sampling ---------------------------------------------------------------------

    async def control(self, sim: str, **body: Any) -> None:
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.sims[sim] + "/sim/control", json=body) as r,
        ):
            r.raise_for_status()

    async def faults(self) -> None:
        plan: list[tuple[float, str, Callable[[], Awaitable[None]]]] = [
            (SCHEDULE[0][0], "gpu-a down", lambda: self.control("gpu-a", fault="error500")),
            (SCHEDULE[0][1], "gpu-a back", lambda: self.control("gpu-a", reset=True)),
            (SCHEDULE[1][0], "provider rpm 20", lambda: self.control("provider", rpm_limit=20)),
            (SCHEDULE[1][1], "provider unlimited", lambda: self.control("provider", rpm_limit=None)),
            (RELOAD_AT, "POST /admin/reload", self.reload_post),
            (SCHEDULE[2][0], "gpu-b hangs 30%",
             lambda: self.control("gpu-b", fault="hang", fault_rate=0.3)),
            (HUP_AT, "SIGHUP", self.reload_hup),
            (SCHEDULE[2][1], "gpu-b back", lambda: self.control("gpu-b", reset=True)),
        ]  # fmt: skip
        for at, what, action in plan:
            await asyncio.sleep(max(0.0, at * self.duration - self.now()))
            try:
                await action()
                self.tally.events.append(f"{self.now():7.1f}s  {what}")
            except Exception as exc:  # the soak reports, it does not stop
                self.tally.events.append(f"{self.now():7.1f}s  {what} FAILED: {exc!r}")

    async def reload_post(self) -> None:
        self.write_config(groq_out_price=0.09)
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                self.url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            ) as r,
        ):
            if r.status != 200:
                raise RuntimeError(f"reload answered {r.status}: {(await r.text())[:200]}")

    async def reload_hup(self) -> None:
        assert self.proc is not None
        self.write_config(groq_out_price=0.08)
        self.proc.popen.send_signal(signal.SIGHUP)

    async def sample_rss(self) -> None:
        assert self.proc is not None
        while self.now() < self.duration:
            kb = _rss_kb(self.proc.popen.pid)
            if kb:
                self.tally.rss.append((self.now(), kb, self.phase()))
            await asyncio.sleep(5.0)

    # --- the run ----------------------------------------------------------------------------------

    async def run(self) -> int:
        await self.start_sims()
        self.write_config(groq_out_price=0.08)
        await self.start_gateway()
        self.t0 = time.monotonic()
        conn = aiohttp.TCPConnector(limit=self.concurrency + 4)
        try:
            async with aiohttp.ClientSession(connector=conn) as session:
                never = [self._at(f * self.duration, self.never_reader) for f in (0.1, 0.62)]
                await asyncio.gather(
                    *(self.client(session, i) for i in range(self.concurrency)),
                    self.slow_reader(session),
                    self.faults(),
                    self.sample_rss(),
                    *never,
                )
            upstream = {name: await self._sim_total(name) for name in self.sims}
            async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics") as r:
                metrics = await r.text()
        finally:
            assert self.proc is not None
            t = time.monotonic()
            self.proc.stop(grace=40.0)  # SIGTERM: drain, flush the ledger, exit 0
            stop_s = time.monotonic() - t
            for runner in self.runners:
                await runner.cleanup()
        self.report(upstream, stop_s, metrics)
        return self.verdict()

    def verdict(self) -> int:
        """Print every failed check; 1 if any failed."""
        assert self.proc is not None
        t = self.tally
        n = sum(t.unexpected.values())
        failed = [f"{n} unexpected client-visible error(s): {dict(t.unexpected)}"] if n else []
        if self.missing_rows:
            failed.append(f"{self.missing_rows} completion(s) without an 'ok' ledger row")
        if self.proc.popen.returncode != 0:
            failed.append(f"gateway exit code {self.proc.popen.returncode} after SIGTERM")
        if self.tracebacks:
            failed.append(f"{self.tracebacks} Traceback(s) in the gateway log")
        failed += [f"fault step failed: {e.strip()}" for e in t.events if "FAILED" in e]
        print("\nverdict: " + ("PASS" if not failed else "FAIL"))
        for f in failed:
            print("  - " + f)
        return 1 if failed else 0

    async def _at(self, t: float, action: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(max(0.0, t - self.now()))
        await action()

    async def _sim_total(self, name: str) -> int:
        async with aiohttp.ClientSession() as s, s.get(self.sims[name] + "/sim/stats") as r:
            return int((await r.json())["total"])

    # --- the report ---------------------------------------------------------------------------

    def report(self, upstream: dict[str, int], stop_s: float, metrics: str) -> None:
        t = self.tally
        assert self.proc is not None
        print(
            f"\nneogate soak: {self.duration / 60:.1f} min, {self.concurrency} clients, out {self.out}"
        )
        print(
            f"gateway exit code {self.proc.popen.returncode} after SIGTERM ({stop_s:.1f}s to stop)"
        )
        print("\nevents:")
        for e in t.events:
            print("  " + e)
        ok = len(t.ok)
        print(f"\nrequests: {t.sent} sent, {ok} complete, {len(t.partial)} partial streams, "
              f"{sum(t.errors.values())} client-visible errors")  # fmt: skip
        print("\nclient-visible errors by phase, model and cause:")
        print(f"  {'phase':<28} {'model':<14} {'cause':<44} {'count':>6}")
        for (phase, model, cause), n in sorted(t.errors.items()):
            print(f"  {phase:<28} {model:<14} {cause:<44} {n:>6}")
        if not t.errors:
            print("  (none)")
        failover = sum(
            n for (ph, m, c), n in t.errors.items() if m == SMALL and not c.startswith("429")
        )
        print(f"  -> errors on {SMALL} (3 backends) other than rate limits: {failover}")
        print(f"  -> errors the schedule does not explain: {sum(t.unexpected.values())}")
        total_up = sum(upstream.values())
        print(f"\nupstream requests: {upstream} = {total_up}; client requests {t.sent}; "
              f"ratio {total_up / max(1, t.sent):.3f}")  # fmt: skip
        for name in ("neogate_retries_total", "neogate_upstream_errors_total"):
            lines = [ln for ln in metrics.splitlines() if ln.startswith(name + "{")]
            print(f"{name}: " + ", ".join(ln.split("{", 1)[1] for ln in lines))
        cuts = [f"{s:.1f}s {'finished' if done else 'cut'}" for s, done in t.cuts]
        print(f"never-reading clients (30 s without reading): closed after {cuts}")
        print(f"slow reader streams: {dict(Counter(t.slow_reads))}")
        print("\nRSS of the gateway process:")
        print(f"  {'t (s)':>7} {'RSS (MB)':>9}  phase")
        for ts, kb, phase in t.rss:
            print(f"  {ts:7.0f} {kb / 1024:9.1f}  {phase}")
        after = [kb for ts, kb, _ in t.rss if ts >= WARMUP * self.duration]
        if after:
            growth = (after[-1] - after[0]) / after[0] * 100
            spread = (max(after) - min(after)) / after[0] * 100
            print(f"  after warm-up: first {after[0] / 1024:.1f} MB, last {after[-1] / 1024:.1f} MB,"
                  f" growth {growth:+.1f}%, max-min {spread:.1f}%")  # fmt: skip
        self.report_ledger(ok)
        errors = [
            ln for ln in self.proc.tail(100000).splitlines() if " ERROR " in ln or "Traceback" in ln
        ]
        self.tracebacks = sum(1 for ln in errors if "Traceback" in ln)
        print(f"\ngateway log: {len(errors)} ERROR/Traceback lines ({self.proc.log_path})")
        for ln in errors[:10]:
            print("  " + ln[:160])

    def report_ledger(self, ok: int) -> None:
        path = self.out / "ledger.db"
        with sqlite3.connect(path) as db:
            # The row's key is the gateway's own request id; ours is kept beside it.
            rows = db.execute(
                "SELECT coalesce(client_request_id, request_id), attempt, outcome FROM ledger"
            ).fetchall()
        by_rid = Counter(r[0] for r in rows)
        outcomes = Counter(r[2] for r in rows)
        soak_rows = {r[0] for r in rows if r[0].startswith("soak-") and r[2] == "ok"}
        missing = self.tally.ok - soak_rows
        self.missing_rows = len(missing)
        print(f"\nledger: {len(rows)} rows {dict(outcomes)}")
        print(f"  completions received by clients: {ok}; with an 'ok' ledger row: {ok - len(missing)}; "
              f"missing: {len(missing)}")  # fmt: skip
        print(f"  partial streams received: {len(self.tally.partial)}; "
              f"their rows: {len(self.tally.partial & set(by_rid))}")  # fmt: skip
        print(f"  request ids with more than one row: {sum(1 for n in by_rid.values() if n > 1)}")


def _code(raw: bytes) -> str:
    try:
        obj = orjson.loads(raw)
        return str(obj["error"].get("code") or obj["error"].get("type"))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return "non-json"


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", help="directory for config, ledger and gateway log (default: temp)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="neogate-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # the gateway's relative data paths land here, not in the repository
    return asyncio.run(Soak(args.minutes, args.concurrency, out, args.seed).run())


if __name__ == "__main__":
    raise SystemExit(main())
