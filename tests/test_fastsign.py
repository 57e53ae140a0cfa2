"""Group commit on the sign path: many calls in one transaction, each with its own outcome.

`run_batch` is driven directly so the calls certainly share one batch; the API tests cover
the same path one call at a time, and `test_concurrency_pg` across processes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update
from sqlmodel import Session

from core.errors import (
    ApprovalRequired,
    BadRequest,
    Forbidden,
    NotFound,
    SigngateError,
    Unauthorized,
    Unavailable,
)
from store import audit
from store.fastsign import PreparedBatch, SignBatcher, SignCall, SqliteDatabase, open_database, run_batch
from store.models import ApiToken, AuditEvent, Grant, Identity, SigningOperation
from store.signing import SignResult
from tests.conftest import Api, Ident, db_backend, insert_grant

sqlite_only = pytest.mark.skipif(db_backend() != "sqlite", reason="SQLite only")
postgresql_only = pytest.mark.skipif(db_backend() != "postgresql", reason="PostgreSQL only")

DIGEST = base64.b64encode(hashlib.sha256(b"release 1.0").digest()).decode()


def call(who: Ident, signer_id: str, **overrides: Any) -> SignCall:
    fields: dict[str, Any] = {
        "signer_id": signer_id,
        "signing_algorithm": "ECDSA_SHA256",
        "data_b64": DIGEST,
        "is_digest": True,
        "token": who.token,
        "ip_address": "198.51.100.9",
    }
    return SignCall(**{**fields, **overrides})


def chain_report(engine: Engine) -> audit.ChainReport:
    with Session(engine) as session:
        return audit.verify(session)


def operations_of(engine: Engine, signer_id: str) -> list[SigningOperation]:
    with Session(engine) as session:
        return list(
            session.exec(select(SigningOperation).where(SigningOperation.signer_id == signer_id))  # type: ignore[call-overload]
            .scalars()
            .all()
        )


async def policy_signer(api: Api, members: list[Ident]) -> dict[str, Any]:
    approver = await api.identity()
    policy = await api.policy([([approver], 1)])
    return await api.signer(members=members, policy_id=policy["id"])


async def test_fifty_calls_in_one_batch_spend_exactly_the_grant(api: Api, app: Any, engine: Engine) -> None:
    member = await api.identity(scopes=["codesign:sign"])
    signer = await policy_signer(api, [member])
    grant_id = insert_grant(engine, signer_id=signer["id"], identity_id=member.id, operations=7)
    before = chain_report(engine)

    db = open_database(engine)
    try:
        outcomes = run_batch(db, app.state.ctx.key_store, [call(member, signer["id"]) for _ in range(50)])
    finally:
        db.close()

    successes = [o for o in outcomes if isinstance(o, SignResult)]
    assert len(successes) == 7
    assert all(isinstance(o, ApprovalRequired) for o in outcomes if not isinstance(o, SignResult))
    assert {s.grant_id for s in successes} == {grant_id}
    with Session(engine) as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None
        assert (grant.used_sign_operations, grant.status) == (7, "exhausted")
        events = session.exec(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.seq > before.head_seq)  # type: ignore[arg-type]
        ).one()
    ops = operations_of(engine, signer["id"])
    assert Counter(op.status for op in ops) == {"success": 7, "denied": 43}
    assert {op.id for op in ops if op.status == "success"} == {s.operation_id for s in successes}
    assert all(op.grant_id == grant_id and op.request_id for op in ops if op.status == "success")
    assert all(op.ip_address == "198.51.100.9" and op.actor_id == member.id for op in ops)
    report = chain_report(engine)
    assert report.valid, report
    assert events[0] == 50 and report.head_seq >= before.head_seq + 50


async def test_a_batch_spends_grants_in_order_and_pinned_calls_share_what_is_left(
    api: Api, app: Any, engine: Engine
) -> None:
    """One batch, one caller, two grants: calls take the grant that ends first, then the next;
    calls pinned to a grant see what the unpinned calls of the same batch left of it."""
    member = await api.identity(scopes=["codesign:sign"])
    signer = await policy_signer(api, [member])
    first = insert_grant(
        engine, signer_id=signer["id"], identity_id=member.id, operations=3, valid_for=timedelta(minutes=30)
    )
    second = insert_grant(engine, signer_id=signer["id"], identity_id=member.id, operations=4)
    calls = [call(member, signer["id"]) for _ in range(5)]
    calls += [call(member, signer["id"], grant_id=second) for _ in range(3)]

    db = open_database(engine)
    try:
        outcomes = run_batch(db, app.state.ctx.key_store, calls)
    finally:
        db.close()

    granted = [o.grant_id if isinstance(o, SignResult) else type(o).__name__ for o in outcomes]
    # 3 from the first grant, 2 from the second; the pinned calls find 2 left of its 4.
    assert granted == [first] * 3 + [second] * 4 + ["ApprovalRequired"]
    with Session(engine) as session:
        used = {g: session.get(Grant, g) for g in (first, second)}
        assert {g: (x.used_sign_operations, x.status) for g, x in used.items() if x} == {
            first: (3, "exhausted"),
            second: (4, "exhausted"),
        }
    denied = [op for op in operations_of(engine, signer["id"]) if op.status == "denied"]
    assert [op.grant_id for op in denied] == [second]
    assert chain_report(engine).valid


async def test_a_group_the_first_grant_covers_exactly_spends_it_and_leaves_the_next(
    api: Api, app: Any, engine: Engine
) -> None:
    """The usual case, one statement: the grant that ends first has enough for the whole group;
    taking its last operation marks it exhausted; the next grant is left untouched."""
    member = await api.identity(scopes=["codesign:sign"])
    signer = await policy_signer(api, [member])
    first = insert_grant(
        engine, signer_id=signer["id"], identity_id=member.id, operations=4, valid_for=timedelta(minutes=30)
    )
    second = insert_grant(engine, signer_id=signer["id"], identity_id=member.id, operations=4)

    db = open_database(engine)
    try:
        batches = [
            run_batch(db, app.state.ctx.key_store, [call(member, signer["id"]) for _ in range(n)])
            for n in (3, 1, 2)
        ]
    finally:
        db.close()

    granted = [[o.grant_id if isinstance(o, SignResult) else o for o in outcomes] for outcomes in batches]
    assert granted == [[first] * 3, [first], [second] * 2]
    with Session(engine) as session:
        used = {g: session.get(Grant, g) for g in (first, second)}
        assert {g: (x.used_sign_operations, x.status) for g, x in used.items() if x} == {
            first: (4, "exhausted"),
            second: (2, "active"),
        }
    assert chain_report(engine).valid


async def test_a_mixed_batch_answers_each_call_on_its_own(api: Api, app: Any, engine: Engine) -> None:
    member = await api.identity(scopes=["codesign:sign"])
    no_scope = await api.identity(scopes=["codesign:request"])
    outsider = await api.identity(scopes=["codesign:sign"])
    revoked = await api.identity(scopes=["codesign:sign"])
    open_signer = await api.signer(members=[member, no_scope, revoked])
    grant_signer = await policy_signer(api, [member])
    with Session(engine) as session:
        token_id = session.execute(select(ApiToken.id).where(ApiToken.identity_id == revoked.id)).scalar_one()  # type: ignore[call-overload]
    await api.call("DELETE", f"/identities/{revoked.id}/tokens/{token_id}", api.admin, expect=204)
    before = chain_report(engine)

    calls = [
        call(member, open_signer["id"]),  # signed
        call(no_scope, open_signer["id"]),  # 403 forbidden, not recorded
        call(outsider, open_signer["id"]),  # 403 not_member, not recorded
        call(revoked, open_signer["id"]),  # 401, not recorded
        call(member, "no-such-signer"),  # 404, not recorded
        call(member, open_signer["id"], data_b64="%%"),  # 400, not recorded
        call(member, grant_signer["id"]),  # 403 approval_required, recorded as denied
        call(member, open_signer["id"], is_digest=False, data_b64=base64.b64encode(b"x").decode()),  # signed
        # The same callers again, in the same batch: the same answers.
        call(outsider, open_signer["id"]),
        call(revoked, open_signer["id"]),
        call(member, grant_signer["id"]),
        call(no_scope, open_signer["id"]),
    ]
    db = open_database(engine)
    try:
        outcomes = run_batch(db, app.state.ctx.key_store, calls)
    finally:
        db.close()

    kinds = [type(o) if not isinstance(o, SigngateError) else (type(o), o.code) for o in outcomes]
    assert kinds == [
        SignResult,
        (Forbidden, "forbidden"),
        (Forbidden, "not_member"),
        (Unauthorized, "unauthorized"),
        (NotFound, "not_found"),
        (BadRequest, "invalid_data"),
        (ApprovalRequired, "approval_required"),
        SignResult,
        (Forbidden, "not_member"),
        (Unauthorized, "unauthorized"),
        (ApprovalRequired, "approval_required"),
        (Forbidden, "forbidden"),
    ]
    assert Counter(op.status for op in operations_of(engine, open_signer["id"])) == {"success": 2}
    assert [op.status for op in operations_of(engine, grant_signer["id"])] == ["denied", "denied"]
    report = chain_report(engine)
    assert report.valid and report.count - before.count == 4


async def test_recorded_events_hash_as_the_audit_chain_does_whatever_the_names_hold(
    api: Api, app: Any, engine: Engine
) -> None:
    """Each event's hash is computed where the batch is written (on PostgreSQL, by the server
    from canonical text cut around what it settles): an actor name and an IP address with
    quotes, backslashes, non-ASCII and line separators (set in the database, beyond what the API
    accepts), client metadata, success and denial in one batch all verify, and the stored rows
    read back as written."""
    member = await api.identity(scopes=["codesign:sign"])
    name = 'Zoë "Q" \\ d\u2028ev ✓ \x01'
    ip = '2001:db8::1 "ü" \\'
    with Session(engine) as session:
        session.execute(update(Identity).where(Identity.id == member.id).values(name=name))  # type: ignore[arg-type]
        session.commit()
    signer = await policy_signer(api, [member])
    open_signer = await api.signer(members=[member])
    grant_id = insert_grant(engine, signer_id=signer["id"], identity_id=member.id, operations=2)
    metadata = {"job": 'build "42"', "emoji": "🚀", "nested": {"n": [1, None, True]}}
    before = chain_report(engine)
    calls = [call(member, signer["id"], client_metadata=metadata, ip_address=ip) for _ in range(3)]
    calls.append(call(member, open_signer["id"], client_metadata=metadata, ip_address=None))

    db = open_database(engine)
    try:
        outcomes = run_batch(db, app.state.ctx.key_store, calls)
    finally:
        db.close()

    assert [type(o).__name__ for o in outcomes] == [
        "SignResult",
        "SignResult",
        "ApprovalRequired",
        "SignResult",
    ]
    report = chain_report(engine)
    assert report.valid, report
    assert report.count - before.count == 4
    with Session(engine) as session:
        events = (
            session.exec(
                select(AuditEvent).where(AuditEvent.seq > before.head_seq).order_by(AuditEvent.seq)  # type: ignore[call-overload, arg-type]
            )
            .scalars()
            .all()
        )
    ours = [e for e in events if e.actor_id == member.id]
    assert [e.action for e in ours] == ["signing_operation.success"] * 2 + ["signing_operation.denied"] + [
        "signing_operation.success"
    ]
    assert all(e.actor_name == name for e in ours)
    assert [e.ip_address for e in ours] == [ip, ip, ip, None]
    assert [e.data["grantId"] for e in ours] == [grant_id, grant_id, None, None]
    assert ours[2].data["error"] and ours[2].request_id is None and ours[0].request_id
    ops = {op.id: op for op in operations_of(engine, signer["id"]) + operations_of(engine, open_signer["id"])}
    assert all(op.client_metadata == metadata for op in ops.values())
    assert [ops[e.entity_id].status for e in ours] == ["success", "success", "denied", "success"]


async def test_calls_of_one_loop_turn_share_a_batch(api: Api, app: Any, engine: Engine) -> None:
    member = await api.identity(scopes=["codesign:sign"])
    signer = await policy_signer(api, [member])
    insert_grant(engine, signer_id=signer["id"], identity_id=member.id, operations=5)
    batcher = SignBatcher(engine, app.state.ctx.key_store)
    sizes: list[int] = []
    original = batcher._record

    def counting(db: Any, prepared: PreparedBatch) -> Any:
        sizes.append(len(prepared.outcomes))
        return original(db, prepared)

    batcher._record = counting  # type: ignore[method-assign]
    try:
        outcomes = await asyncio.gather(
            *(batcher.sign(call(member, signer["id"])) for _ in range(20)), return_exceptions=True
        )
    finally:
        batcher.close()
    assert sizes == [20]
    assert sum(isinstance(o, SignResult) for o in outcomes) == 5
    assert all(isinstance(o, ApprovalRequired) for o in outcomes if not isinstance(o, SignResult))
    assert chain_report(engine).valid


def record_paths(batcher: SignBatcher) -> list[str]:
    """Where each batch of `batcher` is recorded from: the name of the thread that runs its
    write side, or "async" for one recorded over an asyncio connection (PostgreSQL)."""
    import threading

    paths: list[str] = []
    record, commit_async = batcher._record, batcher._commit_async

    def recording(db: Any, prepared: PreparedBatch) -> Any:
        paths.append(threading.current_thread().name)
        return record(db, prepared)

    async def committing(prepared: PreparedBatch) -> Any:
        paths.append("async")
        return await commit_async(prepared)

    batcher._record = recording  # type: ignore[method-assign]
    batcher._commit_async = committing  # type: ignore[method-assign]
    return paths


async def test_batches_run_on_the_loop_once_their_reads_are_known(api: Api, app: Any, engine: Engine) -> None:
    """SQLite: a batch for signers last seen with an EC key skips the thread; RSA never does.
    PostgreSQL: a batch whose reads all come from the cache is signed on the loop, EC or RSA,
    and recorded over an asyncio connection; the first one, which reads, runs on a thread."""
    import threading

    on_loop = threading.current_thread().name
    on_sqlite = engine.url.get_backend_name() == "sqlite"
    member = await api.identity(scopes=["codesign:sign"])
    ec_signer = await policy_signer(api, [member])
    insert_grant(engine, signer_id=ec_signer["id"], identity_id=member.id, operations=3)
    batcher = SignBatcher(engine, app.state.ctx.key_store)
    paths = record_paths(batcher)
    try:
        outcomes = [
            await asyncio.gather(batcher.sign(call(member, ec_signer["id"])), return_exceptions=True)
            for _ in range(4)
        ]
    finally:
        await batcher.aclose()
    assert paths[0] != on_loop and paths[0] != "async"
    assert paths[1:] == [on_loop if on_sqlite else "async"] * 3
    assert [type(o[0]) for o in outcomes] == [SignResult] * 3 + [ApprovalRequired]
    assert Counter(op.status for op in operations_of(engine, ec_signer["id"])) == {"success": 3, "denied": 1}

    rsa_signer = await api.signer(members=[member], key_algorithm="RSA_2048")
    batcher = SignBatcher(engine, app.state.ctx.key_store)
    paths = record_paths(batcher)
    try:
        results = [
            await batcher.sign(call(member, rsa_signer["id"], signing_algorithm="RSASSA_PKCS1_V1_5_SHA256"))
            for _ in range(3)
        ]
    finally:
        await batcher.aclose()
    assert len(paths) == 3 and paths[0] not in (on_loop, "async")
    if on_sqlite:
        assert on_loop not in paths and "async" not in paths
    else:
        assert paths[1:] == ["async", "async"]
    assert {op.id for op in operations_of(engine, rsa_signer["id"])} == {r.operation_id for r in results}
    assert chain_report(engine).valid


async def test_sign_is_served_by_the_bare_route_and_still_documented(api: Api, app: Any) -> None:
    from api.routes.signers import FastSignEndpoint

    [(method, pattern, endpoint)] = app.fast_routes
    assert method == "POST" and isinstance(endpoint, FastSignEndpoint)
    assert pattern.fullmatch("/api/v1/pki/signers/abc-1/sign").groupdict() == {"signer_id": "abc-1"}
    assert pattern.fullmatch("/api/v1/pki/signers/abc/1/sign") is None
    assert "post" in app.openapi()["paths"]["/api/v1/pki/signers/{signer_id}/sign"]
    member = await api.identity(scopes=["codesign:sign"])
    signer = await api.signer(members=[member])
    path = f"/pki/signers/{signer['id']}/sign"
    r = await api.call(
        "POST", path, member, json={"data": DIGEST, "signingAlgorithm": "ECDSA_SHA256", "isDigest": True}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"signature", "signingAlgorithm", "signerId", "grantId", "operationId"}
    r = await api.http.post("/api/v1" + path, json={"data": DIGEST, "signingAlgorithm": "ECDSA_SHA256"})
    assert (r.status_code, r.headers.get("www-authenticate")) == (401, "Bearer")
    assert r.json() == {"error": "unauthorized", "error_description": "a valid bearer token is required"}
    r = await api.http.get("/api/v1" + path)
    assert r.status_code == 405


async def test_an_unexpected_error_on_the_bare_route_is_the_contracts_500(
    api: Api, app: Any, monkeypatch: Any
) -> None:
    from api.routes.signers import FastSignEndpoint

    async def broken(self: Any, scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    member = await api.identity(scopes=["codesign:sign"])
    signer = await api.signer(members=[member])
    monkeypatch.setattr(FastSignEndpoint, "__call__", broken)
    r = await api.call(
        "POST",
        f"/pki/signers/{signer['id']}/sign",
        member,
        json={"data": DIGEST, "signingAlgorithm": "ECDSA_SHA256", "isDigest": True},
    )
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "error_description": "an internal error occurred"}


async def batcher_beside_another_writer(
    api: Api, app: Any, engine: Engine
) -> tuple[Ident, dict[str, Any], SignBatcher, int]:
    """A member, an EC signer, a batcher that has signed once (it knows the key is EC, so its
    batches run on the loop) and the sign writers' lock file, open as another process would."""
    import os

    member = await api.identity(scopes=["codesign:sign"])
    signer = await api.signer(members=[member])
    batcher = SignBatcher(engine, app.state.ctx.key_store)
    await batcher.sign(call(member, signer["id"]))
    return member, signer, batcher, os.open(f"{engine.url.database}.sign-lock", os.O_RDWR | os.O_CREAT, 0o600)


@sqlite_only  # PostgreSQL batches run on threads, and it has no WAL file to checkpoint
async def test_the_loop_never_waits_for_another_writer(api: Api, app: Any, engine: Engine) -> None:
    """SQLite: while another process holds the writers' lock, an EC batch goes to a thread and
    the event loop keeps serving; the call completes once the lock is free."""
    import fcntl
    import os

    member, signer, batcher, other_writer = await batcher_beside_another_writer(api, app, engine)
    try:
        fcntl.flock(other_writer, fcntl.LOCK_EX)
        pending = asyncio.ensure_future(batcher.sign(call(member, signer["id"])))
        ticks = 0
        for _ in range(20):  # the loop keeps turning while the call waits for the lock
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 20 and not pending.done()
        fcntl.flock(other_writer, fcntl.LOCK_UN)
        result = await asyncio.wait_for(pending, 10)
        assert isinstance(result, SignResult)
    finally:
        os.close(other_writer)
        batcher.close()
    assert Counter(op.status for op in operations_of(engine, signer["id"])) == {"success": 2}


@sqlite_only  # PostgreSQL batches take no writers' lock
async def test_a_short_wait_for_the_writers_lock_stays_on_the_loop(
    api: Api, app: Any, engine: Engine, monkeypatch: Any
) -> None:
    """SQLite: a lock another process lets go of within the spin window is taken on the loop's
    next turns, without a thread waiting for it; past the window a thread waits."""
    import fcntl
    import os

    from store.fastsign import SqliteDatabase

    waits: list[int] = []
    original = SqliteDatabase.wait_until_free

    def counted(self: SqliteDatabase) -> None:
        waits.append(1)
        original(self)

    monkeypatch.setattr(SqliteDatabase, "wait_until_free", counted)
    member, signer, batcher, other_writer = await batcher_beside_another_writer(api, app, engine)
    try:
        batcher.spin_seconds = 60.0
        fcntl.flock(other_writer, fcntl.LOCK_EX)
        pending = asyncio.ensure_future(batcher.sign(call(member, signer["id"])))
        for _ in range(20):  # the loop keeps turning while the call retries the lock
            await asyncio.sleep(0.001)
        assert not pending.done()
        fcntl.flock(other_writer, fcntl.LOCK_UN)
        assert isinstance(await asyncio.wait_for(pending, 10), SignResult)
        assert waits == []
        batcher.spin_seconds = 0.0
        fcntl.flock(other_writer, fcntl.LOCK_EX)
        pending = asyncio.ensure_future(batcher.sign(call(member, signer["id"])))
        await asyncio.sleep(0.05)
        fcntl.flock(other_writer, fcntl.LOCK_UN)
        assert isinstance(await asyncio.wait_for(pending, 10), SignResult)
        assert waits == [1]
    finally:
        os.close(other_writer)
        batcher.close()
    assert Counter(op.status for op in operations_of(engine, signer["id"])) == {"success": 3}


@sqlite_only  # PostgreSQL batches run on threads, and it has no WAL file to checkpoint
async def test_wal_checkpoints_run_beside_the_sign_path_not_in_its_commits(
    api: Api, app: Any, engine: Engine, monkeypatch: Any
) -> None:
    """SQLite: a batch's COMMIT never copies the WAL into the database file (a stall of
    milliseconds for its calls); the batcher's own thread does, once something was committed."""
    import sqlite3
    import threading

    from store.fastsign import WalCheckpointer

    checkpoints: list[str] = []
    original = WalCheckpointer.checkpoint

    def recording(conn: sqlite3.Connection) -> tuple[int, int]:
        checkpoints.append(threading.current_thread().name)
        return original(conn)

    monkeypatch.setattr(WalCheckpointer, "checkpoint", staticmethod(recording))
    member = await api.identity(scopes=["codesign:sign"])
    signer = await api.signer(members=[member])
    batcher = SignBatcher(engine, app.state.ctx.key_store)
    try:
        for _ in range(3):
            assert isinstance(await batcher.sign(call(member, signer["id"])), SignResult)
        [db] = batcher._idle
        assert isinstance(db, SqliteDatabase)
        assert db.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        for _ in range(100):
            if checkpoints:
                break
            await asyncio.sleep(0.01)
        assert checkpoints and set(checkpoints) == {"sign-wal-checkpoint"}
    finally:
        batcher.close()
    assert len(checkpoints) >= 2  # and once more on closing
    assert Counter(op.status for op in operations_of(engine, signer["id"])) == {"success": 3}


@sqlite_only  # PostgreSQL batches run on threads, and it has no WAL file to checkpoint
async def test_the_wal_starts_over_under_a_steady_stream_of_signatures(
    api: Api, app: Any, engine: Engine, monkeypatch: Any
) -> None:
    """SQLite: with commits back to back the WAL never starts over by itself (a writer restarts
    it only if every frame was copied when its transaction began), so it would grow with every
    signature; once it is long, a checkpoint under the sign writers' lock lets the next writer
    start it over. Seen from the checkpoints: the WAL they find gets shorter again."""
    import sqlite3
    import time

    from store.fastsign import WalCheckpointer

    monkeypatch.setattr(WalCheckpointer, "CATCH_UP_FRAMES", 64)
    lengths: list[int] = []
    original = WalCheckpointer.checkpoint

    def recording(conn: sqlite3.Connection) -> tuple[int, int]:
        frames, copied = original(conn)
        lengths.append(frames)
        return frames, copied

    monkeypatch.setattr(WalCheckpointer, "checkpoint", staticmethod(recording))
    member = await api.identity(scopes=["codesign:sign"])
    signer = await api.signer(members=[member])
    batcher = SignBatcher(engine, app.state.ctx.key_store)
    try:
        deadline = time.monotonic() + 10
        while len(lengths) < 6 and time.monotonic() < deadline:
            for _ in range(20):
                assert isinstance(await batcher.sign(call(member, signer["id"])), SignResult)
            await asyncio.sleep(0)  # the checkpointer's thread gets a turn
    finally:
        batcher.close()
    assert len(lengths) >= 6
    assert any(later < earlier for earlier, later in itertools.pairwise(lengths)), lengths


async def test_cached_reads_follow_every_change_to_tokens_members_and_signers(
    api: Api, app: Any, engine: Engine
) -> None:
    """The batcher keeps token and signer rows across batches; any change to them (here through
    the API, from another connection) is seen by the very next call, on both databases, in
    both directions: a member removed is refused, a member added back signs at once."""
    member = await api.identity(scopes=["codesign:sign"])
    other = await api.identity(scopes=["codesign:sign"])
    signer = await policy_signer(api, [member, other])
    for who in (member, other):
        insert_grant(engine, signer_id=signer["id"], identity_id=who.id, operations=100)
    batcher = SignBatcher(engine, app.state.ctx.key_store)
    try:
        for _ in range(3):  # the cache is warm
            assert isinstance(await batcher.sign(call(member, signer["id"])), SignResult)
            assert isinstance(await batcher.sign(call(other, signer["id"])), SignResult)

        with Session(engine) as session:
            token_id = session.execute(
                select(ApiToken.id).where(ApiToken.identity_id == member.id)
            ).scalar_one()  # type: ignore[call-overload]
        await api.call("DELETE", f"/identities/{member.id}/tokens/{token_id}", api.admin, expect=204)
        with pytest.raises(Unauthorized):
            await batcher.sign(call(member, signer["id"]))

        await api.call(
            "PUT", f"/pki/signers/{signer['id']}/members", api.admin, json={"identityIds": []}, expect=200
        )
        with pytest.raises(Forbidden):
            await batcher.sign(call(other, signer["id"]))

        for _ in range(2):  # the refusal is what the cache now holds
            with pytest.raises(Forbidden):
                await batcher.sign(call(other, signer["id"]))
        await api.call(
            "PUT",
            f"/pki/signers/{signer['id']}/members",
            api.admin,
            json={"identityIds": [other.id]},
            expect=200,
        )
        assert isinstance(await batcher.sign(call(other, signer["id"])), SignResult)
        await api.call(
            "PATCH", f"/pki/signers/{signer['id']}", api.admin, json={"status": "disabled"}, expect=200
        )
        with pytest.raises(SigngateError) as refused:
            await batcher.sign(call(other, signer["id"]))
        assert refused.value.code == "signer_disabled"
    finally:
        batcher.close()
    assert chain_report(engine).valid


async def test_a_caller_refused_for_want_of_a_grant_is_read_afresh(
    api: Api, app: Any, engine: Engine
) -> None:
    """A grant appears without any change the cache watches: a caller refused for want of one
    is refused before signing until it has one, then signs at once."""
    member = await api.identity(scopes=["codesign:sign"])
    signer = await policy_signer(api, [member])
    first = insert_grant(engine, signer_id=signer["id"], identity_id=member.id, operations=2)
    batcher = SignBatcher(engine, app.state.ctx.key_store)
    try:
        for _ in range(2):
            assert (await batcher.sign(call(member, signer["id"]))).grant_id == first
        for _ in range(2):
            with pytest.raises(ApprovalRequired):
                await batcher.sign(call(member, signer["id"]))
        second = insert_grant(engine, signer_id=signer["id"], identity_id=member.id, operations=1)
        assert (await batcher.sign(call(member, signer["id"]))).grant_id == second
    finally:
        batcher.close()
    statuses = [op.status for op in sorted(operations_of(engine, signer["id"]), key=lambda op: op.at)]
    assert statuses == ["success", "success", "denied", "denied", "success"]


async def test_a_batch_read_before_a_change_is_recorded_only_after_reading_again(
    api: Api, app: Any, engine: Engine
) -> None:
    """The write side checks the epoch (SQLite inside its write transaction, PostgreSQL in the
    statement that records a batch): a batch prepared from cached reads, then a revocation,
    then the record: nothing is recorded, and the batch read again refuses the revoked caller."""
    from store.fastsign import ReadCache, StaleReads, commit_batch, prepare_batch

    member = await api.identity(scopes=["codesign:sign"])
    other = await api.identity(scopes=["codesign:sign"])
    signer = await policy_signer(api, [member, other])
    grant_id = insert_grant(engine, signer_id=signer["id"], identity_id=member.id, operations=10)
    cache = ReadCache()
    key_store = app.state.ctx.key_store
    db = open_database(engine)
    try:
        assert isinstance(
            commit_batch(db, prepare_batch(db, key_store, [call(member, signer["id"])], None, cache))[0],
            SignResult,
        )
        prepared = prepare_batch(db, key_store, [call(member, signer["id"])], None, cache)
        with Session(engine) as session:
            token_id = session.execute(
                select(ApiToken.id).where(ApiToken.identity_id == member.id)
            ).scalar_one()  # type: ignore[call-overload]
        await api.call("DELETE", f"/identities/{member.id}/tokens/{token_id}", api.admin, expect=204)
        with pytest.raises(StaleReads):
            commit_batch(db, prepared)
        outcome = commit_batch(db, prepare_batch(db, key_store, [call(member, signer["id"])], None, cache))[0]
        assert isinstance(outcome, Unauthorized)
    finally:
        db.close()
    with Session(engine) as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None
        used = grant.used_sign_operations
    successes = [op for op in operations_of(engine, signer["id"]) if op.status == "success"]
    assert used == len(successes) == 1
    assert chain_report(engine).valid


async def test_the_batcher_signs_again_when_the_epoch_moved_under_a_batch(
    api: Api, app: Any, engine: Engine
) -> None:
    """A change between a batch's reads and its record: the batcher reads and signs again and
    records each call once."""
    member = await api.identity(scopes=["codesign:sign"])
    signer = await policy_signer(api, [member])
    grant_id = insert_grant(engine, signer_id=signer["id"], identity_id=member.id, operations=10)
    batcher = SignBatcher(engine, app.state.ctx.key_store)
    original, original_async = batcher._record, batcher._commit_async
    records: list[int | None] = []

    def bump_once(prepared: PreparedBatch) -> None:
        records.append(prepared.epoch)
        if len(records) == 2:  # a change lands between this batch's reads and its record
            with Session(engine) as session:
                session.execute(
                    update(Identity).where(Identity.id == member.id).values(email="x@example.org")
                )  # type: ignore[arg-type]
                session.commit()

    def record(db: Any, prepared: PreparedBatch) -> Any:
        bump_once(prepared)
        return original(db, prepared)

    async def commit_async(prepared: PreparedBatch) -> Any:
        bump_once(prepared)
        return await original_async(prepared)

    batcher._record = record  # type: ignore[method-assign]
    batcher._commit_async = commit_async  # type: ignore[method-assign]
    try:
        results = [await batcher.sign(call(member, signer["id"])) for _ in range(3)]
    finally:
        await batcher.aclose()
    assert [r.grant_id for r in results] == [grant_id] * 3
    assert len({r.operation_id for r in results}) == 3
    assert [op.status for op in operations_of(engine, signer["id"])] == ["success"] * 3
    with Session(engine) as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None and grant.used_sign_operations == 3
    # The second batch was recorded on its second try, from reads at the new epoch.
    first, second, again = records[:3]
    assert len(records) == 4 and second == first and second is not None and again is not None
    assert again > second
    assert chain_report(engine).valid


@postgresql_only
async def test_a_batch_whose_connection_was_lost_is_503_and_the_next_one_reconnects(
    api: Api, app: Any, engine: Engine
) -> None:
    """PostgreSQL, a batch recorded from the loop over an asyncio connection that the server has
    closed meanwhile: its calls get 503 and nothing of it is recorded or spent; the next batch
    opens a new connection and is recorded."""
    import psycopg

    member = await api.identity(scopes=["codesign:sign"])
    signer = await policy_signer(api, [member])
    grant_id = insert_grant(engine, signer_id=signer["id"], identity_id=member.id, operations=10)
    batcher = SignBatcher(engine, app.state.ctx.key_store)
    paths = record_paths(batcher)
    try:
        first = [await batcher.sign(call(member, signer["id"])) for _ in range(2)]  # a thread, then async
        [idle] = batcher._async_idle
        url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (idle.info.backend_pid,))
        lost = await asyncio.gather(batcher.sign(call(member, signer["id"])), return_exceptions=True)
        after = await batcher.sign(call(member, signer["id"]))
    finally:
        await batcher.aclose()
    assert paths[1:] == ["async"] * 3
    assert isinstance(lost[0], Unavailable) and lost[0].status_code == 503
    results = [*first, after]
    assert all(r.grant_id == grant_id for r in results)
    assert {op.id for op in operations_of(engine, signer["id"])} == {r.operation_id for r in results}
    with Session(engine) as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None and grant.used_sign_operations == 3
    assert chain_report(engine).valid


async def test_a_hundred_calls_over_two_batchers_spend_exactly_the_three_operations_left(
    api: Api, app: Any, engine: Engine
) -> None:
    """Two batchers (as two API processes) with their reads cached, 50 concurrent calls each,
    on a grant with 3 operations left: exactly 3 signatures, the rest refused and recorded as
    denied. On PostgreSQL both batches are recorded concurrently over asyncio connections."""
    member = await api.identity(scopes=["codesign:sign"])
    signer = await policy_signer(api, [member])
    grant_id = insert_grant(engine, signer_id=signer["id"], identity_id=member.id, operations=5)
    batchers = [SignBatcher(engine, app.state.ctx.key_store) for _ in range(2)]
    paths = [record_paths(batcher) for batcher in batchers]
    try:
        for batcher in batchers:  # each reads the rows once (and spends 1 operation)
            await batcher.sign(call(member, signer["id"]))
        outcomes = await asyncio.gather(
            *[batcher.sign(call(member, signer["id"])) for _ in range(50) for batcher in batchers],
            return_exceptions=True,
        )
    finally:
        for batcher in batchers:
            await batcher.aclose()
    signed = [o for o in outcomes if isinstance(o, SignResult)]
    assert len(signed) == 3 and {s.grant_id for s in signed} == {grant_id}
    assert all(isinstance(o, ApprovalRequired) for o in outcomes if not isinstance(o, SignResult))
    with Session(engine) as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None and (grant.used_sign_operations, grant.status) == (5, "exhausted")
    assert Counter(op.status for op in operations_of(engine, signer["id"])) == {"success": 5, "denied": 97}
    if engine.url.get_backend_name() == "postgresql":
        assert all(len(p) == 2 and p[1] == "async" for p in paths)
    assert chain_report(engine).valid
