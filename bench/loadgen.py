"""A closed-loop HTTP/1.1 load generator: N clients, each on one keep-alive connection, sending
its next request as soon as the previous answer is read.

httpx costs about 150-250 µs of CPU per request, more than a signature, and on two cores
the load generator shares the CPU with the server: that would measure httpx. This client
writes prebuilt request bytes and parses only the status line and Content-Length (or chunked
framing) on uvloop, at about 15-25 µs per request. Clients are spread over one or more
processes (spawned, not forked: the bench process runs Temporal's Rust core); each process
reports its own CPU time inside the measured window, so the table can say how the cores were
shared.

Only answers that *complete* inside the window [start + warmup, start + warmup + duration]
count; a latency is the time from writing a request to reading its whole answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import socket
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Job:
    host: str
    port: int
    requests: Sequence[bytes]  # complete HTTP/1.1 requests, cycled through
    clients: int
    start_at: float  # time.monotonic() (system-wide on Linux)
    warmup: float
    duration: float
    client_offset: int = 0
    expect_status: int = 200


@dataclass
class Outcome:
    ok: int = 0
    errors: int = 0
    total_ok: int = 0  # expected answers at any time, warm-up included (for bookkeeping checks)
    latencies: array[float] = field(default_factory=lambda: array("d"))
    error_samples: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0  # this generator process, inside the window


def build_request(method: str, path: str, *, host: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    idx = lower.find(b"\r\ncontent-length:")
    if idx >= 0:
        end = lower.index(b"\r\n", idx + 2)
        length = int(lower[idx + 17 : end])
        body = await reader.readexactly(length) if length else b""
        return status, body
    if b"transfer-encoding: chunked" in lower:
        parts: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(parts)
            parts.append(chunk[:-2])
    return status, b""


async def _client(job: Job, index: int, outcome: Outcome) -> None:
    begin = job.start_at + job.warmup
    stop = begin + job.duration
    now = time.monotonic
    reqs = job.requests
    n = len(reqs)
    i = index * 7919
    while now() < stop:
        try:
            reader, writer = await asyncio.open_connection(job.host, job.port, limit=1 << 20)
        except OSError as exc:
            outcome.errors += 1
            if len(outcome.error_samples) < 5:
                outcome.error_samples.append(f"connect: {exc}")
            await asyncio.sleep(0.05)
            continue
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                t0 = now()
                if t0 >= stop:
                    break
                writer.write(reqs[i % n])
                i += 1
                status, body = await _read_answer(reader)
                t1 = now()
                if status == job.expect_status:
                    outcome.total_ok += 1
                if t1 < begin or t1 >= stop:
                    continue
                if status == job.expect_status:
                    outcome.ok += 1
                    outcome.latencies.append(t1 - t0)
                else:
                    outcome.errors += 1
                    if len(outcome.error_samples) < 5:
                        outcome.error_samples.append(f"{status} {body[:200]!r}")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            if begin <= now() < stop:
                outcome.errors += 1
                if len(outcome.error_samples) < 5:
                    outcome.error_samples.append(f"connection: {exc!r}")
        finally:
            writer.close()


async def _cpu_window(job: Job, outcome: Outcome) -> None:
    await asyncio.sleep(max(job.start_at + job.warmup - time.monotonic(), 0))
    c0 = time.process_time()
    await asyncio.sleep(max(job.start_at + job.warmup + job.duration - time.monotonic(), 0))
    outcome.cpu_seconds = time.process_time() - c0


async def _run(job: Job) -> Outcome:
    outcome = Outcome()
    await asyncio.sleep(max(job.start_at - time.monotonic(), 0))
    await asyncio.gather(
        _cpu_window(job, outcome),
        *(_client(job, job.client_offset + k, outcome) for k in range(job.clients)),
    )
    return outcome


def run_job(job: Job) -> dict[str, Any]:
    """Entry point in a generator process."""
    try:
        import uvloop

        outcome = uvloop.run(_run(job))
    except ImportError:
        outcome = asyncio.run(_run(job))
    return {
        "ok": outcome.ok,
        "errors": outcome.errors,
        "total_ok": outcome.total_ok,
        "latencies": outcome.latencies.tobytes(),
        "error_samples": outcome.error_samples,
        "cpu_seconds": outcome.cpu_seconds,
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


@dataclass
class LoadResult:
    clients: int
    processes: int
    duration: float
    ok: int
    errors: int
    total_ok: int
    p50_ms: float
    p99_ms: float
    generator_cores: float
    error_samples: list[str]

    @property
    def rate(self) -> float:
        return self.ok / self.duration


class LoadGenerator:
    """A pool of spawned generator processes, kept for the whole run (spawning costs ~0.3 s)."""

    def __init__(self, max_processes: int = 2) -> None:
        self.max_processes = max_processes
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=max_processes, mp_context=multiprocessing.get_context("spawn")
        )
        # Start the processes now, so the first measurement does not pay for it.
        list(self._pool.map(_noop, range(max_processes)))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def processes_for(self, clients: int) -> int:
        """One process per 16 clients: one process drives ~20k answers/s, more only compete."""
        return max(1, min(self.max_processes, (clients + 15) // 16))

    async def run(
        self,
        *,
        port: int,
        requests: Sequence[bytes],
        clients: int,
        duration: float,
        warmup: float,
        on_window: Any = None,
        host: str = "127.0.0.1",
    ) -> LoadResult:
        """Drive the load; `on_window` (a CpuWindow) is begun/ended around the measured window."""
        procs = self.processes_for(clients)
        start_at = time.monotonic() + 0.3
        shares = [clients // procs + (1 if k < clients % procs else 0) for k in range(procs)]
        jobs = []
        offset = 0
        for share in shares:
            jobs.append(Job(host, port, list(requests), share, start_at, warmup, duration, offset))
            offset += share
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, run_job, job) for job in jobs]
        if on_window is not None:
            await asyncio.sleep(max(start_at + warmup - time.monotonic(), 0))
            on_window.begin()
            await asyncio.sleep(max(start_at + warmup + duration - time.monotonic(), 0))
            on_window.end()
        results = await asyncio.gather(*futures)
        latencies = array("d")
        for r in results:
            latencies.frombytes(r["latencies"])
        ordered = sorted(latencies)
        gen_cpu = sum(r["cpu_seconds"] for r in results)
        if on_window is not None:
            on_window.add("loadgen", gen_cpu / duration)
        return LoadResult(
            clients=clients,
            processes=procs,
            duration=duration,
            ok=sum(r["ok"] for r in results),
            errors=sum(r["errors"] for r in results),
            total_ok=sum(r["total_ok"] for r in results),
            p50_ms=percentile(ordered, 50) * 1000,
            p99_ms=percentile(ordered, 99) * 1000,
            generator_cores=gen_cpu / duration,
            error_samples=[s for r in results for s in r["error_samples"]][:5],
        )


def _noop(_: int) -> None:
    return None
