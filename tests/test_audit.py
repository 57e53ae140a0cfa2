"""The audit trail: queries, chain verification against tampering, concurrency, export.

Tests that tamper with rows, or count sequence numbers from 1, run on a database of their own
(`chain`): the session's shared database is written by every other test at the same time and
must stay valid.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import Engine, delete, insert, select, update
from typer.testing import CliRunner

from cli.audit import app as audit_cli
from core.config import Settings
from core.timeutil import rfc3339
from store import audit
from store.db import make_engine, migrate, session_scope
from store.identities import authenticate, bootstrap_admin
from store.models import AuditEvent, AuditHead
from tests.conftest import CLIENT_IP, Api, create_pg_database, db_backend, unique

EVENTS = AuditEvent.__table__  # type: ignore[attr-defined]
HEAD = AuditHead.__table__  # type: ignore[attr-defined]


# --- a database and app of the test's own -------------------------------------------------


@dataclass
class Chain:
    """A freshly migrated database, an app on it, and its bootstrap admin's token."""

    engine: Engine
    app: Any
    http: httpx.AsyncClient
    token: str
    admin_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def get(self, path: str, expect: int = 200, **params: Any) -> Any:
        r = await self.http.get("/api/v1" + path, headers=self.headers, params=params)
        assert r.status_code == expect, f"GET {path}: {r.status_code} {r.text}"
        return r.json()

    async def verify(self) -> dict[str, Any]:
        return dict(await self.get("/audit-events/verify"))

    async def add_identities(self, n: int) -> list[str]:
        ids = []
        for _ in range(n):
            r = await self.http.post(
                "/api/v1/identities", headers=self.headers, json={"name": unique("u"), "kind": "user"}
            )
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        return ids

    def seqs(self) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(EVENTS.c.seq).order_by(EVENTS.c.seq)).scalars())

    def execute(self, *statements: Any) -> None:
        """Raw writes that bypass store.audit, as someone with database access would."""
        with self.engine.begin() as conn:
            for statement in statements:
                conn.execute(statement)


@pytest.fixture
def own_database(tmp_path: Path) -> Iterator[str]:
    if db_backend() == "postgresql":
        url, drop = create_pg_database()
        yield url
        drop()
    else:
        yield f"sqlite:///{tmp_path / 'audit.db'}"


@pytest.fixture
async def chain(settings: Settings, own_database: str) -> AsyncIterator[Chain]:
    from api.main import create_app

    migrate(own_database)
    engine = make_engine(own_database)
    app = create_app(settings.model_copy(update={"database_url": own_database}), engine=engine)
    token = bootstrap_admin(engine, name="admin")
    assert token is not None
    principal = authenticate(engine, token)
    assert principal is not None
    transport = httpx.ASGITransport(app=app, client=(CLIENT_IP, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://signgate.test") as http:
        yield Chain(engine, app, http, token, principal.identity_id)
    engine.dispose()


# --- queries on the shared database ---------------------------------------------------


async def test_identity_created_is_found_by_entity_and_actor(api: Api) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    alice = await api.identity(scopes=["codesign:request"])
    r = await api.call(
        "GET", "/audit-events", api.admin, params={"entityType": "identity", "entityId": alice.id}, expect=200
    )
    page = r.json()
    assert [e["action"] for e in page["items"]] == ["identity.created", "token.created"]
    assert page["total"] == 2
    created = page["items"][0]
    assert set(created) == {
        "id", "seq", "at", "actorId", "actorName", "action", "entityType", "entityId",
        "requestId", "data", "ipAddress", "prevHash", "hash",
    }  # fmt: skip
    assert created["actorId"] == api.admin.id
    assert created["actorName"] == "admin"
    assert created["ipAddress"] == CLIENT_IP
    assert created["data"] == {"name": alice.name, "kind": "user"}
    assert created["at"].endswith("Z")
    assert page["items"][1]["seq"] > created["seq"]
    assert "token" not in json.dumps(page["items"][1]["data"]).replace("tokenId", "")

    r = await api.call(
        "GET",
        "/audit-events",
        api.admin,
        params={"actorId": api.admin.id, "action": "identity.created", "since": rfc3339(before)},
        expect=200,
    )
    mine = r.json()["items"]
    assert alice.id in [e["entityId"] for e in mine]
    assert all(e["actorId"] == api.admin.id and e["action"] == "identity.created" for e in mine)
    assert [e["seq"] for e in mine] == sorted(e["seq"] for e in mine)


async def test_since_and_pagination(api: Api) -> None:
    bob = await api.identity(scopes=["codesign:request"])
    r = await api.call("GET", "/audit-events", api.admin, params={"entityId": bob.id}, expect=200)
    both = r.json()["items"]
    second_at = both[1]["at"]
    r = await api.call(
        "GET", "/audit-events", api.admin, params={"entityId": bob.id, "since": second_at}, expect=200
    )
    assert [e["id"] for e in r.json()["items"]] == [both[1]["id"]]
    # An unencoded "+" offset arrives as a space; the same instant is still understood.
    plus_two = datetime.fromisoformat(second_at).astimezone(timezone(timedelta(hours=2)))
    r = await api.call(
        "GET",
        f"/audit-events?entityId={bob.id}&since={plus_two.isoformat()}",
        api.admin,
        expect=200,
    )
    assert [e["id"] for e in r.json()["items"]] == [both[1]["id"]]
    future = rfc3339(datetime.now(UTC) + timedelta(days=1))
    r = await api.call("GET", "/audit-events", api.admin, params={"since": future}, expect=200)
    assert r.json() == {"items": [], "total": 0}

    r = await api.call(
        "GET", "/audit-events", api.admin, params={"entityId": bob.id, "limit": 1, "offset": 1}, expect=200
    )
    assert r.json()["total"] == 2
    assert [e["id"] for e in r.json()["items"]] == [both[1]["id"]]


@pytest.mark.parametrize("since", ["yesterday", "2026-11-24", "2026-13-01T00:00:00Z", "1700000000"])
async def test_bad_since_is_400(api: Api, since: str) -> None:
    r = await api.call("GET", "/audit-events", api.admin, params={"since": since}, expect=400)
    assert r.json()["error"] == "invalid_request"
    assert "since" in r.json()["error_description"]


async def test_audit_read_scope_is_required(api: Api) -> None:
    nosy = await api.identity(scopes=["admin", "codesign:request", "codesign:approve", "codesign:sign"])
    for path in ("/audit-events", "/audit-events/verify"):
        r = await api.call("GET", path, nosy, expect=403)
        assert r.json()["error"] == "forbidden"
        await api.call("GET", path, headers={}, expect=401)
    auditor = await api.identity(scopes=["audit:read"])
    await api.call("GET", "/audit-events", auditor, params={"limit": 1}, expect=200)


async def test_shared_chain_verifies(api: Api) -> None:
    await api.identity()
    r = await api.call("GET", "/audit-events/verify", api.admin, expect=200)
    report = r.json()
    assert report["valid"] is True, report
    assert report["firstBrokenSeq"] is None
    assert report["count"] >= report["headSeq"] > 0


# --- verification against tampering -------------------------------------------------------


async def test_untouched_chain_is_valid_and_head_is_last_hash(chain: Chain) -> None:
    await chain.add_identities(3)
    report = await chain.verify()
    page = await chain.get("/audit-events", limit=500)
    assert report == {
        "valid": True,
        "count": page["total"],
        "headHash": page["items"][-1]["hash"],
        "headSeq": page["total"],
        "firstBrokenSeq": None,
    }
    assert [e["seq"] for e in page["items"]] == list(range(1, page["total"] + 1))
    assert page["items"][0]["prevHash"] == audit.GENESIS_HASH
    for earlier, later in zip(page["items"], page["items"][1:], strict=False):
        assert later["prevHash"] == earlier["hash"]


ALTERATIONS: dict[str, Any] = {
    "data": lambda row: {"data": {**row.data, "kind": "machine"}},
    "nested data": lambda row: {"data": {**row.data, "extra": {"a": [1, None]}}},
    "actor": lambda row: {"actor_name": "someone-else"},
    "time": lambda row: {"at": row.at + timedelta(microseconds=1)},
    "entity": lambda row: {"entity_id": str(uuid.uuid4())},
    "action": lambda row: {"action": "identity.deleted"},
    "ip address": lambda row: {"ip_address": "198.51.100.1"},
    "request id": lambda row: {"request_id": str(uuid.uuid4())},
    "own hash": lambda row: {"hash": "f" * 64},
    "previous hash": lambda row: {"prev_hash": "f" * 64},
}


@pytest.mark.parametrize("field", list(ALTERATIONS))
async def test_altered_row_is_named(chain: Chain, field: str) -> None:
    await chain.add_identities(3)
    target = 4
    with chain.engine.connect() as conn:
        row = conn.execute(select(EVENTS).where(EVENTS.c.seq == target)).one()
    chain.execute(update(EVENTS).where(EVENTS.c.seq == target).values(**ALTERATIONS[field](row)))
    report = await chain.verify()
    assert report["valid"] is False
    assert report["firstBrokenSeq"] == target
    assert report["count"] == len(chain.seqs())


@pytest.mark.parametrize("target", [1, 4])
async def test_deleted_row_is_named(chain: Chain, target: int) -> None:
    await chain.add_identities(3)
    chain.execute(delete(EVENTS).where(EVENTS.c.seq == target))
    report = await chain.verify()
    assert (report["valid"], report["firstBrokenSeq"]) == (False, target)


async def test_swapped_rows_are_named_at_the_lower_seq(chain: Chain) -> None:
    await chain.add_identities(3)
    chain.execute(
        update(EVENTS).where(EVENTS.c.seq == 3).values(seq=-1),
        update(EVENTS).where(EVENTS.c.seq == 6).values(seq=3),
        update(EVENTS).where(EVENTS.c.seq == -1).values(seq=6),
    )
    report = await chain.verify()
    assert (report["valid"], report["firstBrokenSeq"]) == (False, 3)


async def test_truncated_tail_is_named(chain: Chain) -> None:
    await chain.add_identities(3)
    last = max(chain.seqs())
    chain.execute(delete(EVENTS).where(EVENTS.c.seq > last - 2))
    report = await chain.verify()
    assert (report["valid"], report["firstBrokenSeq"], report["headSeq"]) == (False, last - 1, last)
    assert report["count"] == last - 2


async def test_event_appended_behind_the_heads_back_is_named(chain: Chain) -> None:
    """Even a correctly chained forgery is caught: the head does not know it."""
    await chain.add_identities(1)
    with chain.engine.connect() as conn:
        last = conn.execute(select(EVENTS).order_by(EVENTS.c.seq.desc()).limit(1)).one()
    forged = {
        "id": str(uuid.uuid4()),
        "seq": last.seq + 1,
        "at": datetime.now(UTC),
        "actor_id": chain.admin_id,
        "actor_name": "admin",
        "action": "identity.created",
        "entity_type": "identity",
        "entity_id": str(uuid.uuid4()),
        "request_id": None,
        "data": {"name": "ghost", "kind": "user"},
        "ip_address": None,
        "prev_hash": last.hash,
    }
    forged["hash"] = audit.event_hash(
        prev_hash=last.hash,
        event_id=forged["id"],
        **{k: v for k, v in forged.items() if k not in ("id", "prev_hash")},
    )
    chain.execute(insert(EVENTS).values(**forged))
    report = await chain.verify()
    assert (report["valid"], report["firstBrokenSeq"]) == (False, last.seq + 1)


# --- hashing survives the database round trip ---------------------------------------------

AWKWARD_DATA: dict[Any, Any] = {
    "nested": {"b": [1, 2.5, {"c": None, "d": [True, False]}], "a": {"z": "", "y": []}},
    "none": None,
    "unicode": 'Grüße 签名 🔏 "quoted" back\\slash\nnewline\ttab',
    "numbers": [0, -1, 2**63 - 1, 2**70, 0.1, 1e300, -0.0, 1.5e-7],
    "when": datetime(2026, 11, 24, 10, 0, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    "tuple": (1, "two"),
    "bytes": b"\x00\xff",
    "nan": float("nan"),
    "surrogate": "\ud800",
    "nul": "a\x00b",
    7: "integer key",
}

AWKWARD_TIMES = [
    datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC),
    datetime(2026, 11, 24, 10, 0, 0, 1, tzinfo=UTC),
    datetime(2026, 11, 24, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 11, 24, 10, 0, 0, 500000, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(2026, 11, 24, 20, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-8))),
]


async def test_hashes_survive_the_database_round_trip(chain: Chain) -> None:
    with session_scope(chain.engine) as session:
        recorded = audit.record(
            session,
            actor=audit.Actor(id=None, name="round-trip", ip_address="2001:db8::1"),
            action="test.round_trip",
            entity_type="test",
            entity_id="awkward",
            data=AWKWARD_DATA,
        )
    # Events with chosen times, chained the way record() chains them.
    with chain.engine.begin() as conn:
        head = conn.execute(select(HEAD).where(HEAD.c.id == 1)).one()
        seq, prev = head.seq, head.hash
        for at in AWKWARD_TIMES:
            seq += 1
            fields = {
                "seq": seq,
                "at": at,
                "actor_id": None,
                "actor_name": None,
                "action": "test.time",
                "entity_type": "test",
                "entity_id": "time",
                "request_id": None,
                "data": {"at": at, "n": None},
                "ip_address": None,
            }
            fields["data"] = audit.to_json_value(fields["data"])
            event_id = str(uuid.uuid4())
            digest = audit.event_hash(prev_hash=prev, event_id=event_id, **fields)
            conn.execute(insert(EVENTS).values(id=event_id, prev_hash=prev, hash=digest, **fields))
            prev = digest
        conn.execute(update(HEAD).where(HEAD.c.id == 1).values(seq=seq, hash=prev))

    report = await chain.verify()
    assert report["valid"] is True, report

    # What was hashed is what is stored: a fresh connection reads back the same values.
    with chain.engine.connect() as conn:
        stored = conn.execute(select(EVENTS).where(EVENTS.c.id == recorded.id)).one()
        times = conn.execute(select(EVENTS.c.at).where(EVENTS.c.action == "test.time").order_by(EVENTS.c.seq))
        assert list(times.scalars()) == AWKWARD_TIMES
    assert stored.data == recorded.data
    assert stored.at == recorded.at
    assert stored.data["nested"] == AWKWARD_DATA["nested"]
    assert stored.data["numbers"] == AWKWARD_DATA["numbers"]
    assert stored.data["when"] == "2026-11-24T04:30:00.000001Z"
    assert stored.data["tuple"] == [1, "two"]
    assert stored.data["bytes"] == "AP8="
    assert stored.data["7"] == "integer key"
    assert stored.data["nan"] == "nan"

    # The API answer alone is enough to recompute every hash (what an outside auditor does).
    page = await chain.get("/audit-events", limit=500)
    prev = audit.GENESIS_HASH
    for item in page["items"]:
        assert item["prevHash"] == prev
        assert item["hash"] == hash_of_exported(item)
        prev = item["hash"]


def hash_of_exported(item: dict[str, Any]) -> str:
    return audit.event_hash(
        prev_hash=item["prevHash"],
        seq=item["seq"],
        event_id=item["id"],
        at=datetime.fromisoformat(item["at"]),
        actor_id=item["actorId"],
        actor_name=item["actorName"],
        action=item["action"],
        entity_type=item["entityType"],
        entity_id=item["entityId"],
        request_id=item["requestId"],
        data=item["data"],
        ip_address=item["ipAddress"],
    )


# --- concurrency and rollback -----------------------------------------------------------


async def test_concurrent_writers_leave_a_gapless_valid_chain(chain: Chain) -> None:
    threads, per_thread = (8, 25) if db_backend() == "postgresql" else (4, 10)
    start = len(chain.seqs())
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                with session_scope(chain.engine) as session:
                    audit.record(
                        session,
                        actor=audit.SYSTEM,
                        action="test.concurrent",
                        entity_type="test",
                        entity_id=f"writer-{n}",
                        data={"i": i},
                    )
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    total = start + threads * per_thread
    assert chain.seqs() == list(range(1, total + 1))
    report = await chain.verify()
    assert (report["valid"], report["count"], report["headSeq"]) == (True, total, total)
    page = await chain.get("/audit-events", action="test.concurrent", entityId="writer-0")
    assert [e["data"]["i"] for e in page["items"]] == list(range(per_thread))


def test_verify_sees_one_snapshot_while_writers_commit(chain: Chain) -> None:
    """Head and events are read together: a commit landing mid-verify never looks like tampering."""
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            with session_scope(chain.engine) as session:
                audit.record(
                    session, actor=audit.SYSTEM, action="test.busy", entity_type="test", entity_id="b"
                )

    workers = [threading.Thread(target=writer) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        reports: list[audit.ChainReport] = []
        deadline = time.monotonic() + 30
        # Until writers have committed between many verifications (SQLite's lock is not fair).
        while len(reports) < 40 or reports[-1].count < reports[0].count + 20:
            assert time.monotonic() < deadline, "writers made no progress"
            with session_scope(chain.engine) as session:
                reports.append(audit.verify(session))
            time.sleep(0.002)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert [r for r in reports if not r.valid] == []


async def test_rolled_back_event_leaves_no_gap(chain: Chain) -> None:
    before = chain.seqs()
    rolled_back_id = ""
    with pytest.raises(RuntimeError, match="change failed"), session_scope(chain.engine) as session:
        event = audit.record(
            session, actor=audit.SYSTEM, action="test.doomed", entity_type="test", entity_id="x"
        )
        rolled_back_id = event.id
        assert event.seq == len(before) + 1
        raise RuntimeError("change failed")
    with session_scope(chain.engine) as session:
        kept = audit.record(
            session, actor=audit.SYSTEM, action="test.kept", entity_type="test", entity_id="x"
        )
    assert kept.seq == len(before) + 1
    assert chain.seqs() == [*before, kept.seq]
    assert (await chain.get("/audit-events", action="test.doomed"))["total"] == 0
    assert rolled_back_id not in [e["id"] for e in (await chain.get("/audit-events", limit=500))["items"]]
    assert (await chain.verify())["valid"] is True


async def test_events_recorded_together_chain_like_events_recorded_one_by_one(chain: Chain) -> None:
    before = chain.seqs()
    with session_scope(chain.engine) as session:
        audit.record(session, actor=audit.SYSTEM, action="test.single", entity_type="test", entity_id="x")
        audit.record_many(
            session,
            [
                audit.PendingEvent(
                    actor=audit.Actor(id=None, name=f"writer {n}", ip_address="192.0.2.1"),
                    action=f"test.together.{n}",
                    entity_type="test",
                    entity_id="y",
                    request_id="r",
                    data={"n": n, "awkward": AWKWARD_DATA},
                )
                for n in range(3)
            ],
        )
        audit.record_many(session, [])
    with session_scope(chain.engine) as session:
        audit.record(session, actor=audit.SYSTEM, action="test.after", entity_type="test", entity_id="x")
    first = len(before) + 1
    assert chain.seqs() == [*before, *range(first, first + 5)]
    with chain.engine.connect() as conn:
        rows = conn.execute(select(EVENTS).where(EVENTS.c.seq >= first).order_by(EVENTS.c.seq)).all()
    assert [r.action for r in rows] == [
        "test.single",
        "test.together.0",
        "test.together.1",
        "test.together.2",
        "test.after",
    ]
    assert [r.actor_name for r in rows[1:4]] == ["writer 0", "writer 1", "writer 2"]
    assert all(r.request_id == "r" and r.ip_address == "192.0.2.1" for r in rows[1:4])
    assert rows[2].data["awkward"]["nested"] == AWKWARD_DATA["nested"]
    assert [r.prev_hash for r in rows[1:]] == [r.hash for r in rows[:-1]]
    assert (await chain.verify())["valid"] is True


async def test_request_history_in_order(chain: Chain) -> None:
    """requestId gives one signing request's whole story, in chain order, and nothing else."""
    request_id, other = str(uuid.uuid4()), str(uuid.uuid4())
    story = [
        ("request.opened", "signing_request", request_id),
        ("request.approved", "signing_request", request_id),
        ("request.opened", "signing_request", other),
        ("request.approved", "signing_request", request_id),
        ("grant.created", "grant", str(uuid.uuid4())),
        ("signing.succeeded", "signing_operation", str(uuid.uuid4())),
        ("signing.succeeded", "signing_operation", str(uuid.uuid4())),
    ]
    for action, entity_type, entity_id in story:
        with session_scope(chain.engine) as session:
            belongs_to = other if entity_id == other else request_id
            audit.record(
                session,
                actor=audit.SYSTEM,
                action=action,
                entity_type=entity_type,
                entity_id=entity_id,
                request_id=belongs_to,
            )
    page = await chain.get("/audit-events", requestId=request_id)
    assert [e["action"] for e in page["items"]] == [
        "request.opened",
        "request.approved",
        "request.approved",
        "grant.created",
        "signing.succeeded",
        "signing.succeeded",
    ]
    assert {e["requestId"] for e in page["items"]} == {request_id}


# --- signgate audit export --------------------------------------------------------------


@pytest.fixture
def served(chain: Chain) -> Iterator[str]:
    """The chain's app on a real HTTP port, as the CLI meets a server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(chain.app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


async def test_export_writes_every_event_as_json_lines(chain: Chain, served: str, tmp_path: Path) -> None:
    await chain.add_identities(8)
    expected = (await chain.get("/audit-events", limit=500))["items"]
    out = tmp_path / "audit.jsonl"
    env = {"SIGNGATE_URL": served, "SIGNGATE_TOKEN": chain.token}
    result = CliRunner().invoke(audit_cli, ["export", "--out", str(out), "--page-size", "4"], env=env)
    assert result.exit_code == 0, result.output
    assert f"exported {len(expected)} audit events" in result.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == expected
    assert len(expected) == 10  # two full pages of four and a short one
    assert not (tmp_path / "audit.jsonl.partial").exists()

    # Filters go through; standard output when no --out; a URL naming /api/v1 works too.
    since = expected[-3]["at"]
    env["SIGNGATE_URL"] = served + "/api/v1/"
    result = CliRunner().invoke(audit_cli, ["export", "--since", since], env=env)
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        e for e in expected if e["at"] >= since
    ]


async def test_export_errors_are_the_apis_words(chain: Chain, served: str, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    cases = [
        ({"SIGNGATE_URL": served, "SIGNGATE_TOKEN": chain.token}, ["--since", "yesterday"], 1, "since must"),
        ({"SIGNGATE_URL": served, "SIGNGATE_TOKEN": "sg_wrong"}, [], 1, "a valid bearer token is required"),
        ({"SIGNGATE_URL": "http://127.0.0.1:9", "SIGNGATE_TOKEN": "x"}, [], 1, "cannot reach"),
        ({"SIGNGATE_URL": "", "SIGNGATE_TOKEN": ""}, [], 2, "SIGNGATE_URL"),
    ]
    for env, args, code, words in cases:
        result = CliRunner().invoke(audit_cli, ["export", "--out", str(out), *args], env=env)
        assert result.exit_code == code, result.output
        assert words in " ".join(result.stderr.split())
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert not out.exists()
        assert not (tmp_path / "audit.jsonl.partial").exists()


async def test_signgate_audit_export_command(chain: Chain, served: str, tmp_path: Path) -> None:
    """The installed `signgate audit export` command, as an operator runs it."""
    import asyncio
    import os
    import subprocess
    import sys

    await chain.add_identities(2)
    expected = (await chain.get("/audit-events", limit=500))["items"]
    out = tmp_path / "export.jsonl"
    signgate = Path(sys.executable).parent / "signgate"
    env = {**os.environ, "SIGNGATE_URL": served, "SIGNGATE_TOKEN": chain.token}
    proc = await asyncio.to_thread(
        subprocess.run,
        [str(signgate), "audit", "export", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == expected
