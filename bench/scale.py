"""Benchmark 4: many requests open and waiting. Memory of the worker, the Temporal server and
the API, and the latency of the list call an approver's dashboard makes over them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench import procs
from bench.fixtures import Api, Fixtures
from bench.loadgen import percentile
from bench.servers import SigngateStack

OPEN_IN_FLIGHT = 50
LIST_PATH = "/pki/signing-requests?status=open&limit=50"


def memory(stack: SigngateStack) -> dict[str, float]:
    return {
        "worker_mb": procs.total_rss_mb(stack.worker.pids() if stack.worker else []),
        "temporal_mb": procs.total_rss_mb(stack.temporal.child.pids()),
        "api_mb": procs.total_rss_mb(stack.api.pids() if stack.api else []),
    }


async def measure(
    api: Api, fx: Fixtures, stack: SigngateStack, *, count: int, list_calls: int
) -> dict[str, Any]:
    signer_id = fx.signers["scale"]["id"]
    before = memory(stack)
    peak = dict(before)
    opened = 0
    errors: list[str] = []
    next_index = 0

    async def opener() -> None:
        nonlocal opened, next_index
        while next_index < count:
            next_index += 1
            try:
                await api.open_request(fx.requester, signer_id, 1)
                opened += 1
            except Exception as exc:
                errors.append(repr(exc)[:300])

    async def sampler(stop: asyncio.Event) -> None:
        while not stop.is_set():
            for k, v in memory(stack).items():
                peak[k] = max(peak[k], v)
            await asyncio.sleep(0.5)

    t0 = time.monotonic()
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(stop))
    last_report = t0
    openers = [asyncio.create_task(opener()) for _ in range(OPEN_IN_FLIGHT)]
    while not all(o.done() for o in openers):
        await asyncio.sleep(1)
        if time.monotonic() - last_report > 30:
            last_report = time.monotonic()
            print(f"    ... {opened} of {count} requests open", flush=True)
    open_seconds = time.monotonic() - t0
    # Waiting means settled: every request is recorded open and the worker is idle (a workflow
    # whose API saw no pre-approval writes nothing more until it is decided or expires).
    settle_deadline = time.monotonic() + 600
    while time.monotonic() < settle_deadline:
        persisted = stack.db_scalar(
            f"SELECT count(*) FROM signing_requests WHERE signer_id = '{signer_id}' AND status = 'open'"
        )
        if persisted is not None and persisted >= opened:
            break
        await asyncio.sleep(1)
    worker_pids = stack.worker.pids() if stack.worker else []
    for _ in range(60):
        c0 = sum(procs.cpu_seconds(p) for p in worker_pids)
        await asyncio.sleep(1)
        if sum(procs.cpu_seconds(p) for p in worker_pids) - c0 < 0.03:
            break
    settle_seconds = time.monotonic() - t0 - open_seconds
    stop.set()
    await sampling
    after = memory(stack)
    for k, v in after.items():
        peak[k] = max(peak[k], v)
    waiting = stack.db_scalar("SELECT count(*) FROM signing_requests WHERE status = 'open'")

    latencies: list[float] = []
    total_seen = None
    for _ in range(5):  # warm-up
        await api.call("GET", LIST_PATH, fx.admin)
    for _ in range(list_calls):
        t = time.perf_counter()
        page = await api.call("GET", LIST_PATH, fx.admin)
        latencies.append(time.perf_counter() - t)
        total_seen = page["total"]
    latencies.sort()
    return {
        "requested": count,
        "opened": opened,
        "open_errors": len(errors),
        "open_error_samples": errors[:5],
        "open_seconds": open_seconds,
        "open_rate": opened / open_seconds if open_seconds else 0.0,
        "settle_seconds": settle_seconds,
        "waiting_in_db": waiting,
        "list_total": total_seen,
        "memory_before": before,
        "memory_after": after,
        "memory_peak": peak,
        "list_calls": list_calls,
        "list_p50_ms": percentile(latencies, 50) * 1000,
        "list_p99_ms": percentile(latencies, 99) * 1000,
    }
