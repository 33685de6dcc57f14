"""Ledger write benchmark: rows/s through LedgerWriter with many concurrent record() calls.

    python -m loadtest.bench_ledger [--rows 50000] [--concurrency 1000] [--kind sqlite|postgres]
                                    [--dsn postgresql://postgres@127.0.0.1:5432/test]

Each of `concurrency` tasks records rows one after another (as request handlers
would), so commits are grouped by the writer, not by the benchmark. Also printed: the
process CPU time (all threads) per row to build the rows and to record them;
`--concurrency 13` gives the ~13-row commits of the gateway at c=32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

from gateway.metering.ledger import LedgerRow, LedgerWriter, Spool, make_store
from gateway.metering.money import UnitPrices
from gateway.metering.usage import Usage


def _row(i: int, run: str) -> LedgerRow:
    return LedgerRow.from_usage(
        request_id=f"{run}-{i}",
        attempt=0,
        ts=time.time(),
        tenant=f"tenant-{i % 7}",
        model="llama-8b",
        backend="groq" if i % 3 else "local-h100",
        backend_model="llama-3.1-8b-instant",
        usage=Usage(512, 128, cached_tokens=256),
        prices=UnitPrices.of(0.05, 0.08, cached_input_per_m=0.025, version="bench"),
        ttft_s=0.12,
        total_s=0.9,
        stream=True,
        outcome="ok",
        batch_size=(i % 40) + 1 if i % 3 == 0 else None,
        is_local=i % 3 == 0,
    )


async def _bench(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    store = make_store(args.kind, path=workdir / "ledger.db", dsn=args.dsn, schema=schema)
    writer = LedgerWriter(store, Spool(workdir / "ledger.spool"), max_batch=args.max_batch)
    await writer.start()
    run = uuid.uuid4().hex[:8]
    cpu0 = time.process_time()
    rows = [_row(i, run) for i in range(args.rows)]
    build_s = time.process_time() - cpu0
    per_task = args.rows // args.concurrency
    latencies: list[float] = []

    async def worker(k: int) -> None:
        for row in rows[k * per_task : (k + 1) * per_task]:
            t0 = time.perf_counter()
            await writer.record(row)
            latencies.append(time.perf_counter() - t0)

    started, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu0
    stats = writer.stats()
    if args.kind == "postgres":
        await store.fetch(f"DROP SCHEMA {schema} CASCADE")
    await writer.close()
    latencies.sort()
    n = len(latencies)
    return {
        "rows": n,
        "seconds": round(elapsed, 3),
        "rows_per_s": round(n / elapsed),
        "batches": stats.batches,
        "mean_batch": round(stats.rows_written / max(stats.batches, 1), 1),
        "record_p50_ms": round(latencies[n // 2] * 1000, 2),
        "record_p99_ms": round(latencies[int(n * 0.99)] * 1000, 2),
        "build_cpu_us_per_row": round(build_s / len(rows) * 1e6, 2),
        "record_cpu_us_per_row": round(cpu_s / n * 1e6, 1),
        "spooled": stats.rows_spooled,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--kind", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="neogate-bench-") as tmp:
        result = asyncio.run(_bench(args, Path(tmp)))
    print(json.dumps({"kind": args.kind, "concurrency": args.concurrency, **result}))


if __name__ == "__main__":
    main()
