"""A grant of 5 operations under 200 concurrent sign calls over two API processes on PostgreSQL.

Runs whatever SIGNGATE_TEST_DB says: it makes its own PostgreSQL database and starts the real
processes (two `uvicorn api.main:create_app`, one `python worker.py`) against it and the test
Temporal server, so the grant comes from an approved request on the production path.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from sqlalchemy import text
from temporalio.testing import WorkflowEnvironment

from store.db import make_engine, migrate
from store.identities import bootstrap_admin
from tests.conftest import assert_eventually, create_pg_database, pg_admin_url, unique

REPO = Path(__file__).resolve().parent.parent
OPERATIONS = 5
CALLS = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_reachable() -> bool:
    from sqlalchemy import create_engine

    engine = create_engine(pg_admin_url())
    try:
        with engine.connect():
            return True
    except Exception:
        return False
    finally:
        engine.dispose()


class Stack:
    """Server processes started by this test, stopped (and their logs kept) by it."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.processes.append((name, proc))
        return proc

    def api(self, name: str) -> str:
        port = free_port()
        self.start(
            name,
            "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", "--no-access-log",
        )  # fmt: skip
        return f"http://127.0.0.1:{port}"

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} (exit {proc.poll()})\n{(self.log_dir / f'{name}.log').read_text(errors='replace')[-3000:]}"
            for name, proc in self.processes
        )

    def stop(self) -> None:
        for _, proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.processes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def pg_database() -> Iterator[str]:
    if not postgres_reachable():
        pytest.skip(f"no PostgreSQL server at {pg_admin_url()}")
    url, drop = create_pg_database()
    try:
        migrate(url)
        yield url
    finally:
        drop()


async def wait_healthy(client: httpx.AsyncClient, stack: Stack) -> None:
    async def up() -> bool:
        assert all(proc.poll() is None for _, proc in stack.processes), stack.logs()
        try:
            return (await client.get("/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    await assert_eventually(up, timeout=60, interval=0.1)


async def test_200_concurrent_signs_over_two_processes_spend_exactly_5_operations(
    pg_database: str, temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    engine = make_engine(pg_database)
    admin_token = bootstrap_admin(engine, name="admin")
    assert admin_token is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNGATE_")}
    env.update(
        SIGNGATE_DATABASE_URL=pg_database,
        SIGNGATE_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        SIGNGATE_TEMPORAL_ADDRESS=temporal_env.client.service_client.config.target_host,
        SIGNGATE_TASK_QUEUE=f"signgate-pg-{uuid.uuid4().hex[:8]}",
        SIGNGATE_DATA_DIR=str(tmp_path / "data"),
        SIGNGATE_LOG_LEVEL="WARNING",
    )
    stack = Stack(tmp_path, env)
    clients: list[httpx.AsyncClient] = []
    try:
        urls = [stack.api("api-1"), stack.api("api-2")]
        stack.start("worker", "worker.py")
        timeout = httpx.Timeout(120.0)
        limits = httpx.Limits(max_connections=CALLS, max_keepalive_connections=CALLS)
        clients = [httpx.AsyncClient(base_url=u, timeout=timeout, limits=limits) for u in urls]
        for client in clients:
            await wait_healthy(client, stack)
        first = clients[0]

        async def call(method: str, path: str, token: str, expect: int, **kw: Any) -> Any:
            r = await first.request(
                method, "/api/v1" + path, headers={"Authorization": f"Bearer {token}"}, **kw
            )
            assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}\n{stack.logs()}"
            return r.json()

        async def identity(scopes: list[str]) -> tuple[str, str]:
            created = await call(
                "POST", "/identities", admin_token, 201, json={"name": unique("user"), "kind": "user"}
            )
            token = await call(
                "POST", f"/identities/{created['id']}/tokens", admin_token, 201, json={"scopes": scopes}
            )
            return created["id"], token["token"]

        requester_id, requester = await identity(["codesign:request", "codesign:sign"])
        approver_id, approver = await identity(["codesign:approve"])
        cert = await call(
            "POST",
            "/pki/certificates",
            admin_token,
            201,
            json={
                "name": unique("cert"),
                "keyAlgorithm": "EC_P256",
                "subject": {"commonName": "pg"},
                "mode": "self-signed",
            },
        )
        policy = await call(
            "POST",
            "/pki/signing-policies",
            admin_token,
            201,
            json={
                "name": unique("policy"),
                "steps": [{"name": "release", "approverIds": [approver_id], "requiredApprovals": 1}],
                "maxSignings": OPERATIONS,
            },
        )
        signer = await call(
            "POST",
            "/pki/signers",
            admin_token,
            201,
            json={"name": unique("signer"), "certificateId": cert["id"], "signingPolicyId": policy["id"]},
        )
        await call(
            "PUT",
            f"/pki/signers/{signer['id']}/members",
            admin_token,
            200,
            json={"identityIds": [requester_id]},
        )

        request = await call(
            "POST",
            "/pki/signing-requests",
            requester,
            201,
            json={"signerId": signer["id"], "allowedSignOperations": OPERATIONS, "justification": "burst"},
        )

        async def worker_recorded_it() -> bool:
            events = await call(
                "GET",
                f"/audit-events?entityId={request['id']}&action=signing_request.opened",
                admin_token,
                200,
            )
            return bool(events["total"])

        await assert_eventually(worker_recorded_it, timeout=60, interval=0.1)
        approved = await call(
            "POST", f"/pki/signing-requests/{request['id']}/approve", approver, 200, json={}
        )
        assert approved["status"] == "approved"
        grant_id = approved["grantId"]
        grant = await call("GET", f"/pki/grants/{grant_id}", requester, 200)
        assert (grant["allowedSignOperations"], grant["usedSignOperations"], grant["status"]) == (
            OPERATIONS,
            0,
            "active",
        )

        digest = hashlib.sha256(b"one release, many pipelines").digest()
        body = {
            "data": base64.b64encode(digest).decode(),
            "signingAlgorithm": "ECDSA_SHA256",
            "isDigest": True,
        }
        headers = {"Authorization": f"Bearer {requester}"}
        path = f"/api/v1/pki/signers/{signer['id']}/sign"
        started = time.perf_counter()
        responses = await asyncio.gather(
            *(clients[i % 2].post(path, json=body, headers=headers) for i in range(CALLS))
        )
        elapsed = time.perf_counter() - started
        print(f"\n{CALLS} concurrent sign calls over 2 API processes on PostgreSQL: {elapsed:.2f}s")

        codes = Counter(r.status_code for r in responses)
        assert codes == {200: OPERATIONS, 403: CALLS - OPERATIONS}, f"{codes}\n{stack.logs()}"
        assert {r.json()["error"] for r in responses if r.status_code == 403} == {"approval_required"}
        successes = [r.json() for r in responses if r.status_code == 200]
        assert {s["grantId"] for s in successes} == {grant_id}
        assert len({s["operationId"] for s in successes}) == OPERATIONS
        # Both processes took part in the burst, and the winners may come from either.
        served = Counter(i % 2 for i, r in enumerate(responses) if r.status_code in (200, 403))
        assert served == {0: CALLS // 2, 1: CALLS // 2}

        public_key = x509.load_pem_x509_certificate(cert["certificatePem"].encode()).public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        for success in successes:
            public_key.verify(
                base64.b64decode(success["signature"]), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256()))
            )

        grant = await call("GET", f"/pki/grants/{grant_id}", requester, 200)
        assert grant["usedSignOperations"] == OPERATIONS
        assert grant["status"] == "exhausted"
        exhausted = await call(
            "GET", f"/pki/grants?signerId={signer['id']}&status=exhausted", admin_token, 200
        )
        assert [g["id"] for g in exhausted["items"]] == [grant_id]

        ops = await call("GET", f"/pki/signers/{signer['id']}/operations?limit=500", admin_token, 200)
        assert ops["total"] == CALLS
        statuses = Counter(op["status"] for op in ops["items"])
        assert statuses == {"success": OPERATIONS, "denied": CALLS - OPERATIONS}
        assert {op["actorId"] for op in ops["items"]} == {requester_id}
        assert {op["operationId"] for op in successes} == {
            op["id"] for op in ops["items"] if op["status"] == "success"
        }
        assert all(
            op["grantId"] == grant_id and op["requestId"] == request["id"]
            for op in ops["items"]
            if op["status"] == "success"
        )
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT status, count(*) FROM signing_operations WHERE signer_id = :s GROUP BY status"),
                {"s": signer["id"]},
            ).all()
            used = conn.execute(
                text("SELECT used_sign_operations, status FROM grants WHERE id = :g"), {"g": grant_id}
            ).one()
        assert dict(rows) == {"success": OPERATIONS, "denied": CALLS - OPERATIONS}
        assert tuple(used) == (OPERATIONS, "exhausted")
    finally:
        for client in clients:
            await client.aclose()
        stack.stop()
        engine.dispose()
