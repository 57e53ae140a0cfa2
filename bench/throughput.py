"""Benchmark 3: requests opened, approved and granted end to end per second with 50 in flight,
against a bare Temporal workflow of the same shape on the same server, driven by its own tiny
worker in this process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bench.fixtures import Api, Fixtures
from bench.loadgen import percentile
from bench.procs import CpuWindow


async def closed_loop(
    cycle: Callable[[], Awaitable[None]],
    *,
    in_flight: int,
    duration: float,
    warmup: float,
    window: CpuWindow | None = None,
) -> dict[str, Any]:
    """Run `cycle` in `in_flight` loops; count cycles that end inside the measured window."""
    start = time.monotonic()
    begin, stop = start + warmup, start + warmup + duration
    done: list[float] = []
    errors: list[str] = []

    async def loop() -> None:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                await cycle()
            except Exception as exc:
                t1 = time.monotonic()
                if begin <= t1 < stop:
                    errors.append(repr(exc)[:300])
                continue
            t1 = time.monotonic()
            if begin <= t1 < stop:
                done.append(t1 - t0)

    async def cpu() -> None:
        if window is None:
            return
        await asyncio.sleep(max(begin - time.monotonic(), 0))
        window.begin()
        await asyncio.sleep(max(stop - time.monotonic(), 0))
        window.end()

    await asyncio.gather(cpu(), *(loop() for _ in range(in_flight)))
    done.sort()
    return {
        "in_flight": in_flight,
        "duration": duration,
        "completed": len(done),
        "rate": len(done) / duration,
        "p50_ms": percentile(done, 50) * 1000,
        "p99_ms": percentile(done, 99) * 1000,
        "errors": len(errors),
        "error_samples": errors[:5],
        "cores": dict(window.cores) if window else {},
    }


async def measure_signgate(
    api: Api, fx: Fixtures, *, in_flight: int, duration: float, warmup: float, window: CpuWindow
) -> dict[str, Any]:
    signer_id = fx.signers["flow"]["id"]

    async def cycle() -> None:
        request = await api.open_request(fx.requester, signer_id, 1)
        state = await api.approve(fx.approvers[0], request["id"])
        if state["status"] != "approved" or not state.get("grantId"):
            raise RuntimeError(f"approve answered status {state['status']} without a grant")

    return await closed_loop(cycle, in_flight=in_flight, duration=duration, warmup=warmup, window=window)


async def measure_bare(
    address: str, *, in_flight: int, duration: float, warmup: float, window: CpuWindow, await_result: bool
) -> dict[str, Any]:
    from temporalio.client import Client
    from temporalio.worker import Worker

    from bench.bare_workflow import BareWorkflow, bare_activity

    client = await Client.connect(address)
    task_queue = f"bench-bare-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=task_queue, workflows=[BareWorkflow], activities=[bare_activity]):

        async def cycle() -> None:
            request_id = uuid.uuid4().hex
            handle = await client.start_workflow(
                BareWorkflow.run, request_id, id=f"bench-bare-{request_id}", task_queue=task_queue
            )
            await handle.execute_update(BareWorkflow.approve, request_id)
            if await_result:
                await handle.result()

        return await closed_loop(cycle, in_flight=in_flight, duration=duration, warmup=warmup, window=window)
