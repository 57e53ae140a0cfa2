"""Benchmark 1: sign throughput through the API against OpenBao transit at the same concurrency.

signgate is driven through a signer whose policy requires a grant, with one big grant (approved
by someone else) on the caller, so every call looks up the token, checks membership, consumes
one grant operation and commits the signing-operation record before answering. OpenBao is
measured right before signgate at each point, with the same load generator.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import asdict
from typing import Any

from bench import procs
from bench.fixtures import Fixtures
from bench.loadgen import LoadGenerator, LoadResult, build_request
from bench.procs import CpuWindow
from bench.servers import OpenBao, SigngateStack

ALGORITHMS = {
    "ec": ("ECDSA P-256", "ECDSA_SHA256"),
    "rsa": ("RSA-2048", "RSASSA_PKCS1_V1_5_SHA256"),
}
POOL = 64  # distinct digests cycled through


def _digests() -> list[str]:
    return [base64.b64encode(secrets.token_bytes(32)).decode() for _ in range(POOL)]


def signgate_requests(stack: SigngateStack, fx: Fixtures, alg: str) -> list[bytes]:
    signer_id = fx.signers[alg]["id"]
    host = f"127.0.0.1:{stack.api_port}"
    headers = {**fx.requester.headers, "Content-Type": "application/json"}
    return [
        build_request(
            "POST",
            f"/api/v1/pki/signers/{signer_id}/sign",
            host=host,
            headers=headers,
            body=json.dumps({"data": d, "signingAlgorithm": ALGORITHMS[alg][1], "isDigest": True}).encode(),
        )
        for d in _digests()
    ]


def openbao_requests(bao: OpenBao, alg: str) -> list[bytes]:
    host = f"127.0.0.1:{bao.port}"
    headers = {"X-Vault-Token": bao.token, "Content-Type": "application/json"}
    return [
        build_request(
            "POST",
            f"/v1/transit/sign/{alg}/sha2-256",
            host=host,
            headers=headers,
            body=json.dumps(OpenBao.sign_bodies(d)[alg]).encode(),
        )
        for d in _digests()
    ]


def signgate_groups(stack: SigngateStack, bao: OpenBao | None) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {
        "api": stack.api.pids() if stack.api else [],
        "worker": stack.worker.pids() if stack.worker else [],
        "temporal": stack.temporal.child.pids(),
    }
    if stack.backend == "postgresql":
        groups["postgres"] = procs.pids_by_comm("postgres")
    if bao is not None:
        groups["openbao"] = bao.child.pids()
    return groups


def summary(result: LoadResult, cores: dict[str, float]) -> dict[str, Any]:
    data = asdict(result)
    data["rate"] = result.rate
    data["cores"] = cores
    return data


async def run_point(
    gen: LoadGenerator,
    *,
    port: int,
    requests: list[bytes],
    clients: int,
    duration: float,
    warmup: float,
    groups: dict[str, list[int]],
) -> tuple[LoadResult, dict[str, float]]:
    window = CpuWindow(groups)
    result = await gen.run(
        port=port, requests=requests, clients=clients, duration=duration, warmup=warmup, on_window=window
    )
    return result, dict(window.cores)


async def measure_openbao(
    gen: LoadGenerator, bao: OpenBao, alg: str, clients: int, duration: float, warmup: float
) -> dict[str, Any]:
    result, cores = await run_point(
        gen,
        port=bao.port,
        requests=openbao_requests(bao, alg),
        clients=clients,
        duration=duration,
        warmup=warmup,
        groups={"openbao": bao.child.pids()},
    )
    return summary(result, cores)


async def measure_signgate(
    gen: LoadGenerator,
    stack: SigngateStack,
    fx: Fixtures,
    alg: str,
    clients: int,
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    result, cores = await run_point(
        gen,
        port=stack.api_port,
        requests=signgate_requests(stack, fx, alg),
        clients=clients,
        duration=duration,
        warmup=warmup,
        groups=signgate_groups(stack, None),
    )
    return summary(result, cores)
