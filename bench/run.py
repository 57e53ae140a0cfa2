"""`python -m bench [--quick] [--only sign,approval,throughput,scale]`: the whole run.

Order: raw-crypto references first (nothing else busy), then Temporal and OpenBao, then for
each database (SQLite, then PostgreSQL when one answers on 127.0.0.1:5432) a fresh signgate
installation on which the sign, approval and throughput benchmarks run, and last the scale
benchmark on a fresh SQLite installation of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import approval, breakdown, procs, profiling, reference, scale, sign, throughput
from bench.fixtures import Api, Fixtures, create_fixtures
from bench.loadgen import LoadGenerator
from bench.procs import Child, CpuWindow, format_cores
from bench.report import Row, fmt_ms, fmt_rate, git_state, machine, render, write_results
from bench.servers import OpenBao, SigngateStack, TemporalServer, cleanup_dir, pg_available

SECTIONS = ("sign", "approval", "throughput", "scale")
ALG_NAMES = {"ec": "ECDSA P-256", "rsa": "RSA-2048"}
# Sign throughput goals at 8 clients: signgate/OpenBao.
SIGN_TARGETS = {("sqlite", "rsa"): 1.2, ("sqlite", "ec"): 1.0, ("postgresql", "rsa"): 1.0}


@dataclass(frozen=True)
class Config:
    quick: bool
    only: tuple[str, ...]
    backends: tuple[str, ...]
    api_workers: tuple[int, ...]
    clients: tuple[int, ...] = (1, 8, 32)
    sign_seconds: float = 10.0
    sign_warmup: float = 2.0
    # At 8 clients (the targets) OpenBao and signgate alternate this many times; the row quotes
    # the round with the median ratio, and the spread.
    sign_rounds: int = 3
    approvals: int = 200
    flow_in_flight: int = 50
    flow_seconds: float = 30.0
    flow_warmup: float = 5.0
    waiting: int = 10_000
    list_calls: int = 200
    profile: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        only = tuple(s.strip() for s in args.only.split(",") if s.strip()) if args.only else ()
        unknown = set(only) - set(SECTIONS)
        if unknown:
            raise SystemExit(f"unknown benchmark {sorted(unknown)[0]!r}; choose from {', '.join(SECTIONS)}")
        backends = tuple(b.strip() for b in args.db.split(","))
        workers = tuple(int(w) for w in args.api_workers.split(","))
        if args.quick:
            return cls(
                quick=True,
                only=only,
                backends=backends,
                api_workers=workers,
                sign_seconds=3.0,
                sign_warmup=1.0,
                sign_rounds=args.sign_rounds or 1,
                approvals=40,
                flow_seconds=8.0,
                flow_warmup=2.0,
                waiting=args.waiting or 1_000,
                list_calls=50,
                profile=args.profile,
            )
        return cls(
            quick=False,
            only=only,
            backends=backends,
            api_workers=workers,
            sign_rounds=args.sign_rounds or 3,
            waiting=args.waiting or 10_000,
            profile=args.profile,
        )

    def wants(self, section: str) -> bool:
        return not self.only or section in self.only


@dataclass
class Run:
    cfg: Config
    work_dir: Path
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    gen: LoadGenerator | None = None
    temporal: TemporalServer | None = None
    bao: OpenBao | None = None
    stacks: list[SigngateStack] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short durations, fewer requests, 1,000 waiting")
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--db", default="sqlite,postgresql", help="databases for sign/approval/throughput")
    p.add_argument(
        "--api-workers", default="1,2", help="`signgate api --workers` values for the sign benchmark"
    )
    p.add_argument("--waiting", type=int, default=0, help="requests left open for the scale benchmark")
    p.add_argument(
        "--sign-rounds",
        type=int,
        default=0,
        help="OpenBao/signgate alternations at 8 clients (default 3, 1 with --quick)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases)")
    p.add_argument(
        "--profile", default="", help="directory for py-spy profiles of the servers (needs py-spy)"
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- references


def run_references(run: Run) -> dict[str, Any]:
    run.say("raw crypto references (cryptography in-process, openssl speed) ...")
    window = CpuWindow({"bench process": [os.getpid()]})
    window.begin()
    ref = reference.measure(run.cfg.quick)
    window.end()
    ref["cores_during"] = dict(window.cores)
    run.notes.append(f"references measured with the machine at: {format_cores(window.cores)}")
    run.raw["reference"] = ref
    cores = ref["cores"]
    for alg in ("ec", "rsa"):
        name = ALG_NAMES[alg]
        run.rows.append(
            Row(
                "limit",
                f"cryptography {name}, 1 thread",
                fmt_rate(ref["cryptography_1"][alg]),
                value=ref["cryptography_1"][alg],
            )
        )
        run.rows.append(
            Row(
                "limit",
                f"cryptography {name}, {cores} threads",
                fmt_rate(ref["cryptography_all"][alg]),
                ratio=f"x{ref['cryptography_all'][alg] / ref['cryptography_1'][alg]:.2f} of 1 thread",
                value=ref["cryptography_all"][alg],
            )
        )
        run.rows.append(
            Row(
                "limit",
                f"openssl speed {name}, 1 process",
                fmt_rate(ref["openssl_1"].get(alg)),
                value=ref["openssl_1"].get(alg),
            )
        )
        run.rows.append(
            Row(
                "limit",
                f"openssl speed {name}, -multi {cores}",
                fmt_rate(ref["openssl_all"].get(alg)),
                value=ref["openssl_all"].get(alg),
            )
        )
    return ref


# ----------------------------------------------------------------------------- per database


async def new_stack(run: Run, backend: str, name: str) -> tuple[SigngateStack, Api, Fixtures]:
    assert run.temporal is not None
    stack = SigngateStack(backend, run.work_dir / name, run.temporal)
    run.stacks.append(stack)
    run.say(f"{name}: migrating a fresh {backend} database, starting the worker and the API ...")
    stack.create()
    stack.start_worker()
    stack.start_api(1)
    api = Api(stack.url, stack.admin_token)
    fx = await create_fixtures(api)
    if api.read_after_create_misses:
        run.notes.append(
            f"{name}: PUT /pki/signers/{{id}}/members answered 404 {api.read_after_create_misses} time(s) right "
            "after POST /pki/signers had answered 201 (the create was not yet committed); the bench retried"
        )
    return stack, api, fx


async def run_sign(run: Run, stack: SigngateStack, api: Api, fx: Fixtures, ref: dict[str, Any] | None) -> Api:
    cfg = run.cfg
    assert run.gen is not None and run.bao is not None
    backend = stack.backend
    grants = {alg: await api.grant(fx, alg) for alg in ("ec", "rsa")}
    results: dict[str, Any] = {"openbao": {}, "signgate": {}}
    run.raw.setdefault("sign", {})[backend] = results
    total_ok = {"ec": 0, "rsa": 0}
    for workers in cfg.api_workers:
        if stack.api_workers != workers:
            await api.close()
            stack.start_api(workers)
            api = Api(stack.url, stack.admin_token)
        for alg in ("ec", "rsa"):
            for clients in cfg.clients:
                key = f"{alg}/c{clients}"
                # At 8 clients OpenBao is measured again right before each signgate round.
                rounds = cfg.sign_rounds if clients == 8 else 1
                pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
                for n in range(rounds):
                    if rounds > 1 or key not in results["openbao"]:
                        bao = await sign.measure_openbao(
                            run.gen, run.bao, alg, clients, cfg.sign_seconds, cfg.sign_warmup
                        )
                        results["openbao"].setdefault(key, bao)
                        run.say(
                            f"  OpenBao {ALG_NAMES[alg]} c{clients}: {fmt_rate(bao['rate'])} "
                            f"p50 {fmt_ms(bao['p50_ms'])} ms, errors {bao['errors']}; {format_cores(bao['cores'])}"
                        )
                    else:
                        bao = results["openbao"][key]
                    name = f"sign-{backend}-w{workers}-{alg}-c{clients}"
                    with profiled(run, name, stack.api, clients == 8 and n == 0):
                        sg = await sign.measure_signgate(
                            run.gen, stack, fx, alg, clients, cfg.sign_seconds, cfg.sign_warmup
                        )
                    total_ok[alg] += sg["total_ok"]
                    pairs.append((sg, bao))
                    run.say(
                        f"  signgate {backend} w{workers} {ALG_NAMES[alg]} c{clients}: {fmt_rate(sg['rate'])} "
                        f"p50 {fmt_ms(sg['p50_ms'])} ms, errors {sg['errors']} {sg['error_samples'][:1]}; "
                        f"{format_cores(sg['cores'])}"
                        + (
                            f" (round {n + 1} of {rounds}, x{ratio_of(sg, bao):.2f} OpenBao)"
                            if rounds > 1
                            else ""
                        )
                    )
                sg, bao = median_round(pairs)
                results["signgate"][f"w{workers}/{key}"] = sg
                add_sign_row(run, backend, workers, alg, clients, sg, bao, ref)
    # Bookkeeping: every signature answered consumed exactly one grant operation.
    for alg, grant_id in grants.items():
        grant = await api.call("GET", f"/pki/grants/{grant_id}", fx.admin)
        used = grant["usedSignOperations"]
        results[f"grant_check_{alg}"] = {"used": used, "answered_ok": total_ok[alg]}
        if used != total_ok[alg]:
            run.notes.append(
                f"{backend} {ALG_NAMES[alg]}: the grant counts {used} operations used, the load generator "
                f"received {total_ok[alg]} signatures"
            )
    # Where one call's time goes: the API's steps called directly, one at a time.
    for alg in ("ec", "rsa"):
        parts = await asyncio.to_thread(breakdown.measure, stack, fx, alg, 1.0 if cfg.quick else 3.0)
        results[f"breakdown_{alg}"] = parts
        http_c1 = results["signgate"].get(f"w1/{alg}/c1")
        run.say(
            f"  breakdown {backend} {ALG_NAMES[alg]}: "
            + ", ".join(f"{k.removesuffix('_us')} {v:.0f} us" for k, v in parts.items())
        )
        run.rows.append(
            Row(
                "1b. one sign call without HTTP (in-process, 1 at a time)",
                f"{ALG_NAMES[alg]}, {backend}: store.signing.sign",
                f"{parts['sign_total_us']:,.0f} us",
                latency=f"HTTP c1 p50 {http_c1['p50_ms'] * 1000:,.0f} us" if http_c1 else "",
                ratio=(
                    f"crypto alone {parts['crypto_only_us']:.0f} us; its reads and locks in the raw driver "
                    f"{parts['raw_txn_us']:.0f} us; authenticate() (other endpoints) {parts['authenticate_us']:.0f} us"
                ),
                value=parts["sign_total_us"],
            )
        )
    return api


@contextlib.contextmanager
def profiled(run: Run, name: str, child: Child | None, wanted: bool) -> Iterator[None]:
    """py-spy on `child` (and its subprocesses) for the next measurement, with --profile."""
    if not run.cfg.profile or not wanted or child is None or not profiling.available():
        yield
        return
    out_dir = Path(run.cfg.profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.txt"
    seconds = (
        (run.cfg.sign_seconds + run.cfg.sign_warmup) if name.startswith("sign") else run.cfg.flow_seconds
    )
    proc = profiling.start(child.pid, out, seconds + 1)
    try:
        yield
    finally:
        if proc is not None:
            proc.wait(60)
            if out.exists():
                summary = profiling.summarize(out)
                (out_dir / f"{name}.summary.txt").write_text(
                    "".join(f"{share * 100:5.1f}%  {frame}\n" for share, frame in summary)
                )


def ratio_of(sg: dict[str, Any], bao: dict[str, Any]) -> float:
    return sg["rate"] / bao["rate"] if bao["rate"] else float("nan")


def median_round(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Of alternated (signgate, OpenBao) rounds, the one with the median ratio; with more than
    one, the signgate result carries every round (`rounds`) and its own OpenBao rate."""
    if len(pairs) == 1:
        return pairs[0]
    sg, bao = sorted(pairs, key=lambda pair: ratio_of(*pair))[len(pairs) // 2]
    every = [{"signgate": s["rate"], "openbao": b["rate"], "ratio": ratio_of(s, b)} for s, b in pairs]
    return {**sg, "openbao_rate": bao["rate"], "rounds": every}, bao


def add_sign_row(
    run: Run,
    backend: str,
    workers: int,
    alg: str,
    clients: int,
    sg: dict[str, Any],
    bao: dict[str, Any],
    ref: dict[str, Any] | None,
) -> None:
    ratio_bao = ratio_of(sg, bao)
    parts = [f"x{ratio_bao:.2f} OpenBao ({fmt_rate(bao['rate'])})"]
    rounds = sg.get("rounds")
    if rounds:
        ratios = [r["ratio"] for r in rounds]
        parts[0] += f", median of {len(rounds)} alternated rounds (x{min(ratios):.2f}-x{max(ratios):.2f})"
    if ref is not None:
        parts.append(f"x{sg['rate'] / ref['cryptography_1'][alg]:.3f} 1 core")
        parts.append(f"x{sg['rate'] / ref['cryptography_all'][alg]:.3f} all cores")
    target_ratio = SIGN_TARGETS.get((backend, alg)) if clients == 8 else None
    proc = "proc" if workers == 1 else "procs"
    run.rows.append(
        Row(
            f"1. sign throughput, {backend} (API with grant + operation record)",
            f"{ALG_NAMES[alg]}, {clients} clients, {workers} API {proc}",
            fmt_rate(sg["rate"]) + (f" ({sg['errors']} err)" if sg["errors"] else ""),
            latency=f"p50 {fmt_ms(sg['p50_ms'])} p99 {fmt_ms(sg['p99_ms'])}",
            ratio=" / ".join(parts),
            target=f">= {target_ratio:.1f}x OpenBao" if target_ratio else "",
            met=(ratio_bao >= target_ratio) if target_ratio else None,
            cores=format_cores(sg["cores"]),
            value=sg["rate"],
        )
    )


def add_openbao_rows(run: Run) -> None:
    """OpenBao's own figures, from the run next to the first database's signgate runs."""
    sign_raw = run.raw.get("sign", {})
    if not sign_raw:
        return
    first = next(iter(sign_raw.values()))["openbao"]
    for key, bao in first.items():
        alg, clients = key.split("/c")
        run.rows.insert(
            _after_section(run.rows, "limit"),
            Row(
                "peer",
                f"OpenBao transit {ALG_NAMES[alg]}, {clients} clients",
                fmt_rate(bao["rate"]),
                latency=f"p50 {fmt_ms(bao['p50_ms'])} p99 {fmt_ms(bao['p99_ms'])}",
                cores=format_cores(bao["cores"]),
                value=bao["rate"],
            ),
        )


def _after_section(rows: list[Row], section: str) -> int:
    index = 0
    for i, row in enumerate(rows):
        if row.section in (section, "peer"):
            index = i + 1
    return index


async def run_approval(run: Run, stack: SigngateStack, api: Api, fx: Fixtures) -> None:
    """Each policy twice: approving requests that wait (the target), and approving each right
    after opening it (shown beside it: it adds the request's first workflow task)."""
    results = {}
    for signer_key, label in (("ec1", "1-step policy"), ("ec3", "3-step policy")):
        for waiting in (True, False):
            how = "waiting request" if waiting else "approved right after opening"
            run.say(f"  approval latency, {stack.backend}, {label}, {how}: {run.cfg.approvals} requests ...")
            assert run.temporal is not None
            r = await approval.measure(
                api, fx, signer_key, run.cfg.approvals, run.temporal.address, waiting=waiting
            )
            results[signer_key if waiting else f"{signer_key}_right_after_opening"] = r
            run.say(
                f"    p50 {fmt_ms(r['p50_ms'])} p95 {fmt_ms(r['p95_ms'])} p99 {fmt_ms(r['p99_ms'])} ms "
                f"(approve call alone p50 {fmt_ms(r['approve_call_p50_ms'])}), sign retries {r['sign_retries']}"
            )
            for line in r["last_request_timeline"]:
                run.say(f"      {line}")
            met = r["p50_ms"] <= 30 and r["p99_ms"] <= 100
            run.rows.append(
                Row(
                    "2. approval latency: start of final approve -> sign succeeds under the new grant",
                    f"{label}, {how}, {stack.backend}, n={r['count']}",
                    f"p50 {fmt_ms(r['p50_ms'])} ms",
                    latency=f"p95 {fmt_ms(r['p95_ms'])} p99 {fmt_ms(r['p99_ms'])}",
                    ratio=f"approve call alone p50 {fmt_ms(r['approve_call_p50_ms'])} "
                    f"p99 {fmt_ms(r['approve_call_p99_ms'])}",
                    target="p50 <= 30, p99 <= 100" if waiting else "(shown)",
                    met=met if waiting else None,
                    value=r["p50_ms"],
                )
            )
    run.raw.setdefault("approval", {})[stack.backend] = results


async def run_throughput(run: Run, stack: SigngateStack, api: Api, fx: Fixtures) -> None:
    cfg = run.cfg
    assert run.temporal is not None
    if "bare" not in run.raw.get("throughput", {}):
        run.say(f"  bare Temporal reference, {cfg.flow_in_flight} in flight ...")
        bare: dict[str, Any] = {}
        for await_result in (True, False):
            window = CpuWindow({"temporal": run.temporal.child.pids(), "bench process": [os.getpid()]})
            bare["completed" if await_result else "update_answered"] = await throughput.measure_bare(
                run.temporal.address,
                in_flight=cfg.flow_in_flight,
                duration=cfg.flow_seconds,
                warmup=cfg.flow_warmup,
                window=window,
                await_result=await_result,
            )
        run.raw.setdefault("throughput", {})["bare"] = bare
        for kind, label in (
            ("completed", "start, update+activity, result awaited"),
            ("update_answered", "start, update+activity answered"),
        ):
            b = bare[kind]
            run.say(
                f"    bare ({label}): {fmt_rate(b['rate'])}, p50 {fmt_ms(b['p50_ms'])} ms, errors {b['errors']}"
            )
            run.rows.append(
                Row(
                    "3. request throughput, 50 in flight",
                    f"bare Temporal workflow ({label})",
                    fmt_rate(b["rate"]),
                    latency=f"p50 {fmt_ms(b['p50_ms'])} p99 {fmt_ms(b['p99_ms'])}",
                    ratio="reference" if kind == "completed" else "",
                    cores=format_cores(b["cores"]),
                    value=b["rate"],
                )
            )
    bare_rate = run.raw["throughput"]["bare"]["completed"]["rate"]
    run.say(f"  request throughput, {stack.backend}, {cfg.flow_in_flight} in flight ...")
    window = CpuWindow(
        {
            "api": stack.api.pids() if stack.api else [],
            "worker": stack.worker.pids() if stack.worker else [],
            "temporal": stack.temporal.child.pids(),
            "bench process": [os.getpid()],
            **({"postgres": procs.pids_by_comm("postgres")} if stack.backend == "postgresql" else {}),
        }
    )
    r = await throughput.measure_signgate(
        api,
        fx,
        in_flight=cfg.flow_in_flight,
        duration=cfg.flow_seconds,
        warmup=cfg.flow_warmup,
        window=window,
    )
    run.raw["throughput"][stack.backend] = r
    ratio = r["rate"] / bare_rate if bare_rate else float("nan")
    run.say(
        f"    signgate: {fmt_rate(r['rate'])} (x{ratio:.2f} bare), p50 {fmt_ms(r['p50_ms'])} ms, "
        f"errors {r['errors']} {r['error_samples'][:1]}; {format_cores(r['cores'])}"
    )
    run.rows.append(
        Row(
            "3. request throughput, 50 in flight",
            f"signgate open -> approve -> granted, {stack.backend}",
            fmt_rate(r["rate"]) + (f" ({r['errors']} err)" if r["errors"] else ""),
            latency=f"p50 {fmt_ms(r['p50_ms'])} p99 {fmt_ms(r['p99_ms'])}",
            ratio=f"x{ratio:.2f} bare Temporal",
            target=">= 0.70x bare",
            met=ratio >= 0.7,
            cores=format_cores(r["cores"]),
            value=r["rate"],
        )
    )


async def run_scale(run: Run) -> None:
    cfg = run.cfg
    stack, api, fx = await new_stack(run, "sqlite", "scale-sqlite")
    try:
        run.say(f"  opening {cfg.waiting:,} requests, {scale.OPEN_IN_FLIGHT} at a time ...")
        r = await scale.measure(api, fx, stack, count=cfg.waiting, list_calls=cfg.list_calls)
    finally:
        await api.close()
    run.raw["scale"] = r
    run.say(
        f"    opened {r['opened']} in {r['open_seconds']:.0f} s ({fmt_rate(r['open_rate'])}), settled in "
        f"{r['settle_seconds']:.0f} s; worker {r['memory_after']['worker_mb']:.0f} MB "
        f"(peak {r['memory_peak']['worker_mb']:.0f}), Temporal {r['memory_after']['temporal_mb']:.0f} MB; "
        f"list p50 {fmt_ms(r['list_p50_ms'])} p99 {fmt_ms(r['list_p99_ms'])} ms"
    )
    section = f"4. scale: {r['waiting_in_db']:,} requests open and waiting (sqlite)"
    mem_after, mem_peak, mem_before = r["memory_after"], r["memory_peak"], r["memory_before"]
    run.rows += [
        Row(
            section,
            "worker RSS",
            f"{mem_after['worker_mb']:.0f} MB",
            ratio=f"before {mem_before['worker_mb']:.0f} MB, peak {mem_peak['worker_mb']:.0f} MB",
            target="< 300 MB",
            met=mem_peak["worker_mb"] < 300,
            value=mem_after["worker_mb"],
        ),
        Row(
            section,
            "Temporal server RSS",
            f"{mem_after['temporal_mb']:.0f} MB",
            ratio=f"before {mem_before['temporal_mb']:.0f} MB, peak {mem_peak['temporal_mb']:.0f} MB",
            value=mem_after["temporal_mb"],
        ),
        Row(
            section,
            "API RSS (1 process)",
            f"{mem_after['api_mb']:.0f} MB",
            ratio=f"before {mem_before['api_mb']:.0f} MB",
            value=mem_after["api_mb"],
        ),
        Row(
            section,
            "GET /pki/signing-requests?status=open&limit=50",
            f"p50 {fmt_ms(r['list_p50_ms'])} ms",
            latency=f"p99 {fmt_ms(r['list_p99_ms'])}",
            ratio=f"n={r['list_calls']}, total={r['list_total']}",
            target="p50 <= 50",
            met=r["list_p50_ms"] <= 50,
            value=r["list_p50_ms"],
        ),
        Row(
            section,
            "opening them (50 in flight)",
            fmt_rate(r["open_rate"]),
            ratio=f"{r['opened']} in {r['open_seconds']:.0f} s, {r['open_errors']} errors",
            value=r["open_rate"],
        ),
    ]


# ----------------------------------------------------------------------------- the run


async def run_all(run: Run) -> None:
    cfg = run.cfg
    ref = run_references(run) if cfg.wants("sign") else None
    run.say("starting the Temporal dev server ...")
    run.temporal = TemporalServer.start(run.work_dir)
    if cfg.wants("sign"):
        run.say("starting OpenBao (transit keys ecdsa-p256 and rsa-2048) ...")
        run.bao = OpenBao.start(run.work_dir)
        run.gen = LoadGenerator(max_processes=2)
    backends = [b for b in cfg.backends if b != "postgresql" or pg_available()]
    if "postgresql" in cfg.backends and "postgresql" not in backends:
        run.notes.append("PostgreSQL: no server answered at 127.0.0.1:5432; its rows are missing")
    if any(cfg.wants(s) for s in ("sign", "approval", "throughput")):
        for backend in backends:
            await guarded(run, f"{backend} benchmarks", run_backend(run, backend, ref))
    add_openbao_rows(run)
    if cfg.wants("scale"):
        await guarded(run, "scale benchmark", run_scale(run))


async def guarded(run: Run, what: str, step: Coroutine[Any, Any, None]) -> None:
    """A failing part is reported and the run goes on: the other figures are still worth having."""
    try:
        await step
    except Exception as exc:
        traceback.print_exc()
        run.notes.append(f"{what} stopped early: {exc!r}"[:600])


async def run_backend(run: Run, backend: str, ref: dict[str, Any] | None) -> None:
    cfg = run.cfg
    stack, api, fx = await new_stack(run, backend, backend)
    try:
        if cfg.wants("sign"):
            api = await run_sign(run, stack, api, fx, ref)
            if stack.api_workers != 1:
                await api.close()
                stack.start_api(1)
                api = Api(stack.url, stack.admin_token)
        if cfg.wants("approval"):
            await settle(run, stack)
            await guarded(run, f"approval latency on {backend}", run_approval(run, stack, api, fx))
        if cfg.wants("throughput"):
            await settle(run, stack)
            await guarded(run, f"request throughput on {backend}", run_throughput(run, stack, api, fx))
    finally:
        await api.close()
        stack.stop()


async def settle(run: Run, stack: SigngateStack, *, idle_cores: float = 0.3, limit: float = 90.0) -> None:
    """Let the databases finish what the previous section left them (a sign section writes about
    a million rows: PostgreSQL then vacuums and checkpoints, SQLite's WAL is checkpointed) before
    the next section measures: a checkpoint, then wait until the whole machine has been nearly
    idle for two seconds (at most `limit` seconds). What it took is printed and kept."""
    started = time.monotonic()
    with contextlib.suppress(Exception):
        stack.db_scalar("CHECKPOINT" if stack.backend == "postgresql" else "PRAGMA wal_checkpoint(TRUNCATE)")
    quiet, busy = 0, 0.0
    while quiet < 4 and time.monotonic() - started < limit:
        before, t0 = procs.system_cpu(), time.monotonic()
        await asyncio.sleep(0.5)
        after = procs.system_cpu()
        busy = (after[0] - before[0]) / max(time.monotonic() - t0, 1e-6)
        quiet = quiet + 1 if busy < idle_cores else 0
    note = f"{stack.backend}: settled for {time.monotonic() - started:.1f} s before the next section (last 0.5 s: {busy:.2f} cores busy)"
    run.say(note)
    run.raw.setdefault("settle", []).append(note)


def core_sharing_note(run: Run) -> str:
    return (
        f"{os.cpu_count()} cores shared by everything: the load generator (raw HTTP/1.1 keep-alive clients on "
        "uvloop, 1 process up to 16 clients, 2 processes for 32), the API, the worker, Temporal, PostgreSQL and "
        "OpenBao all run on this machine; the last column gives each one's CPU in cores (CPU seconds per second) "
        "inside the measured window, 'busy' the whole machine's."
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = Config.from_args(args)
    work_dir = Path(tempfile.mkdtemp(prefix="signgate-bench-"))
    run = Run(cfg, work_dir)
    mach = machine()
    git = mach.get("git", {})
    if git.get("uncommitted_product_changes"):
        run.notes.append(
            f"measured with uncommitted product changes: {', '.join(git['uncommitted_product_changes'])}"
        )
    print(
        f"signgate benchmark ({'quick' if cfg.quick else 'full'}) on {mach['cpu_model']}, {mach['cores']} cores, "
        f"{mach['memory_mb']} MB, Python {mach['python']}, commit {git.get('commit', '?')[:10]}; work dir {work_dir}",
        flush=True,
    )
    failed = False
    try:
        asyncio.run(run_all(run))
    except BaseException as exc:
        failed = True
        traceback.print_exc()
        run.notes.append(f"the run stopped early: {exc!r}")
    finally:
        for stack in run.stacks:
            stack.stop()
        if run.gen is not None:
            run.gen.close()
        if run.bao is not None:
            run.bao.child.stop()
        if run.temporal is not None:
            run.temporal.child.stop()
    end_commit = git_state().get("commit")
    if git.get("commit") and end_commit and end_commit != git["commit"]:
        run.notes.append(
            f"the code changed during the run: started at commit {git['commit'][:10]}, ended at {end_commit[:10]}; "
            "processes started later ran newer code"
        )
        mach["git"]["commit_at_end"] = end_commit
    run.notes.insert(0, core_sharing_note(run))
    run.notes.insert(
        1,
        "signgate runs as shipped: `signgate api --workers N` (uvicorn), `python worker.py`, "
        "SIGNGATE_LOG_LEVEL=WARNING (no access log lines); Temporal dev server with a db file "
        "and matching partitions = 1.",
    )
    table = render(run.rows, run.notes)
    print("\n" + table, flush=True)
    config = {k: v for k, v in vars(cfg).items()}
    path = write_results(rows=run.rows, notes=run.notes, table=table, raw=run.raw, config=config, mach=mach)
    print(f"\nresults written to {path}", flush=True)
    if failed or args.keep:
        print(f"logs and databases kept in {work_dir}", flush=True)
    else:
        cleanup_dir(work_dir)
    # Temporal's Rust core can abort a finalising interpreter (FACTS.md): leave without finalisation.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)
