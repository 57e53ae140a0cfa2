"""SQLite: the sign path's audit events reach the audit filters' indexes a little later
(`store.deferred`, migration 0004), and every filtered query finds them before and after."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, inspect, text
from sqlmodel import Session, col, select

from store import deferred
from store.db import alembic_config, migrate
from store.fastsign import SignBatcher, SignCall
from store.models import AuditEvent
from tests.conftest import Api, Ident, db_backend

sqlite_only = pytest.mark.skipif(db_backend() != "sqlite", reason="SQLite only")

DIGEST = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


def call(who: Ident, signer_id: str) -> SignCall:
    return SignCall(
        signer_id=signer_id,
        signing_algorithm="ECDSA_SHA256",
        data_b64=DIGEST,
        is_digest=True,
        token=who.token,
        ip_address="198.51.100.9",
    )


def pending(engine: Engine) -> tuple[int, int]:
    """(events not yet in the filter indexes, the mark)."""
    with engine.connect() as conn:
        waiting = conn.execute(text("SELECT count(*) FROM audit_events WHERE indexed = 0")).scalar_one()
        mark = conn.execute(text("SELECT value FROM index_marks WHERE name = 'audit_events'")).scalar_one()
    return int(waiting), int(mark)


async def signing_member(api: Api, app: Any, engine: Engine) -> tuple[Ident, dict[str, Any], SignBatcher]:
    """A caller who may sign, an EC signer of theirs, and a batcher of this app's."""
    member = await api.identity(scopes=["codesign:sign"])
    signer = await api.signer(members=[member])
    return member, signer, SignBatcher(engine, app.state.ctx.key_store)


async def filtered(api: Api, **params: str) -> tuple[int, list[str]]:
    r = await api.call("GET", "/audit-events", api.admin, params={**params, "limit": "100"}, expect=200)
    body = r.json()
    return body["total"], [item["id"] for item in body["items"]]


@sqlite_only
async def test_signed_events_are_found_by_every_filter_before_and_after_they_are_filed(
    api: Api, app: Any, engine: Engine
) -> None:
    member, signer, batcher = await signing_member(api, app, engine)
    try:
        results = await asyncio.gather(*(batcher.sign(call(member, signer["id"])) for _ in range(5)))
        # Written by the batcher: out of the filter indexes until the next filing.
        assert pending(engine)[0] == 5
        # An event written by another path, past the mark and already indexed.
        await api.call(
            "PUT", f"/pki/signers/{signer['id']}/members", api.admin, json={"identityIds": [member.id]}
        )
        queries = [
            {"entityType": "signing_operation", "actorId": member.id},
            {"actorId": member.id},
            {"actorId": member.id, "action": "signing_operation.success"},
            {"entityType": "signing_operation", "entityId": results[2].operation_id},
            {"entityType": "signer", "entityId": signer["id"]},
        ]
        before = [await filtered(api, **q) for q in queries]
        assert before[0][0] == 5 and before[1][0] == 5 and before[2][0] == 5
        assert before[3][0] == 1
        assert before[4][0] >= 1
    finally:
        batcher.close()
    filer = deferred.start_filer(engine)  # as an API process runs one
    assert filer is not None
    filer.close()  # files at its start and at its close
    waiting, mark = pending(engine)
    assert waiting == 0
    with engine.connect() as conn:
        assert mark == conn.execute(text("SELECT max(seq) FROM audit_events")).scalar_one()
    after = [await filtered(api, **q) for q in queries]
    assert after == before


@sqlite_only
async def test_filing_moves_the_mark_a_chunk_at_a_time_and_queries_never_count_twice(
    api: Api, app: Any, engine: Engine
) -> None:
    member, signer, batcher = await signing_member(api, app, engine)
    try:
        for _ in range(3):
            await asyncio.gather(*(batcher.sign(call(member, signer["id"])) for _ in range(2)))
            await api.identity()  # events of another path between them, indexed as written
        path = str(engine.url.database)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            assert pending(engine)[0] == 6
            _, start = pending(engine)
            filed, more = deferred.file_pending(conn, chunk=3)
            assert more
            waiting, mark = pending(engine)
            assert mark == start + 3 and waiting == 6 - filed
            by_action, by_actor = (
                await filtered(api, action="signing_operation.success", actorId=member.id),
                await filtered(api, actorId=member.id),
            )
            assert by_action[0] == 6 and by_actor[0] == 6 and set(by_action[1]) == set(by_actor[1])
            assert deferred.file_all(conn, None) == waiting
        finally:
            conn.close()
        assert pending(engine)[0] == 0
        total, ids = await filtered(api, action="signing_operation.success", actorId=member.id)
        assert total == 6 and len(set(ids)) == 6
    finally:
        batcher.close()


@sqlite_only
async def test_a_filer_files_at_start_then_keeps_the_mark_at_the_last_event(
    api: Api, app: Any, engine: Engine
) -> None:
    """What a process left pending is filed when the next one starts; while it runs, its filer
    also moves the mark past the events other paths write, so the part of a filtered query read
    through the seq index stays short."""
    member, signer, batcher = await signing_member(api, app, engine)
    await asyncio.gather(*(batcher.sign(call(member, signer["id"])) for _ in range(4)))
    batcher.close()  # a process that stopped without filing
    assert pending(engine)[0] == 4
    filer = deferred.Filer(str(engine.url.database), interval=0.05)
    try:

        async def settled() -> tuple[int, int, int]:
            for _ in range(200):
                waiting, mark = pending(engine)
                with engine.connect() as conn:
                    top = int(conn.execute(text("SELECT max(seq) FROM audit_events")).scalar_one())
                if waiting == 0 and mark == top:
                    break
                await asyncio.sleep(0.025)
            return waiting, mark, top

        waiting, mark, top = await settled()
        assert waiting == 0 and mark == top
        await api.identity()  # events written by another path, indexed as written
        waiting, mark, newer = await settled()
        assert newer > top and waiting == 0 and mark == newer
    finally:
        filer.close()


@sqlite_only
def test_filtered_audit_queries_read_the_partial_indexes(engine: Engine) -> None:
    """The audit filter's query, as the API builds it, reads the action index and the seq
    index (the few pending events), not the whole table."""
    with Session(engine) as session:
        where = deferred.visible(session, [col(AuditEvent.action) == "signing_operation.success"])
        statement = select(AuditEvent.id).where(*where).order_by(col(AuditEvent.seq)).limit(50)
        sql = str(statement.compile(engine, compile_kwargs={"literal_binds": True}))
        plan = " | ".join(str(row[-1]) for row in session.execute(text("EXPLAIN QUERY PLAN " + sql)))
    assert "USING INDEX ix_audit_events_action (action=?)" in plan
    assert "(seq>?)" in plan
    assert "SCAN audit_events" not in plan


def test_migration_0004_goes_down_and_up_again(tmp_path: Path) -> None:
    from alembic import command

    url = f"sqlite:///{tmp_path / 'roundtrip.db'}"
    migrate(url)
    engine = create_engine(url)
    try:

        def indexes() -> dict[str, Any]:
            return {str(ix["name"]): ix for ix in inspect(engine).get_indexes("audit_events")}

        assert "indexed" in {c["name"] for c in inspect(engine).get_columns("audit_events")}
        assert "ix_signing_operations_grant_id" not in {
            ix["name"] for ix in inspect(engine).get_indexes("signing_operations")
        }
        command.downgrade(alembic_config(url), "0003")
        engine.dispose()
        assert "indexed" not in {c["name"] for c in inspect(engine).get_columns("audit_events")}
        assert "ix_audit_events_action" in indexes()
        assert "ix_signing_operations_grant_id" in {
            ix["name"] for ix in inspect(engine).get_indexes("signing_operations")
        }
        command.upgrade(alembic_config(url), "head")
        engine.dispose()
        with engine.connect() as conn:
            sql = conn.execute(
                text("SELECT sql FROM sqlite_master WHERE name = 'ix_audit_events_action'")
            ).scalar_one()
        assert "indexed = 1" in sql
    finally:
        engine.dispose()


@sqlite_only
async def test_an_api_process_files_pending_events_while_it_runs(
    api: Api, app: Any, engine: Engine, settings: Any, temporal_env: Any
) -> None:
    """Each API process runs a filer from its start to its stop, every
    SIGNGATE_AUDIT_FILING_SECONDS."""
    import threading

    from api.main import create_app

    member, signer, batcher = await signing_member(api, app, engine)
    await asyncio.gather(*(batcher.sign(call(member, signer["id"])) for _ in range(3)))
    batcher.close()
    assert pending(engine)[0] == 3
    process = create_app(
        settings.model_copy(update={"audit_filing_seconds": 0.05}),
        engine=engine,
        temporal=temporal_env.client,
    )

    async def filed() -> bool:
        for _ in range(200):
            waiting, mark = pending(engine)
            with engine.connect() as conn:
                top = int(conn.execute(text("SELECT max(seq) FROM audit_events")).scalar_one())
            if waiting == 0 and mark == top:
                return True
            await asyncio.sleep(0.025)
        return False

    def filers() -> int:
        return sum(thread.name == "audit-index-filer" for thread in threading.enumerate())

    before = filers()  # the CLI tests' live API runs one too
    async with process.router.lifespan_context(process):
        assert filers() == before + 1
        assert await filed()
        await api.identity()  # the mark follows, while the process runs
        assert await filed()
    assert filers() == before
