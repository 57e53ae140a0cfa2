"""The engine's pool and read connections: what store.db promises besides the migrations."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from core.config import Settings
from store.db import make_engine, read_scope, session_scope
from tests.conftest import db_backend

pg_only = pytest.mark.skipif(db_backend() != "postgresql", reason="PostgreSQL only")


@pytest.fixture
def own_engine(settings: Settings, engine: Engine) -> Iterator[Engine]:
    """A pool of this test's own (the session's engine migrated the database)."""
    fresh = make_engine(settings.effective_database_url, pool_size=3)
    yield fresh
    fresh.dispose()


def _backend_pid(engine: Engine) -> int:
    with read_scope(engine) as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_read_scope_reads_and_leaves_transactions_to_sessions(own_engine: Engine) -> None:
    with read_scope(own_engine) as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    with session_scope(own_engine) as session:
        assert session.execute(text("SELECT 2")).scalar_one() == 2


@pg_only
def test_read_scope_is_autocommit_and_the_pool_gets_a_transactional_connection_back(
    own_engine: Engine,
) -> None:
    with read_scope(own_engine) as conn:
        # Outside a transaction, each statement has its own: no transaction id lingers.
        first = conn.execute(text("SELECT txid_current()")).scalar_one()
        second = conn.execute(text("SELECT txid_current()")).scalar_one()
        assert first != second
    for _ in range(3):  # every pooled connection, whichever the pool hands out
        with session_scope(own_engine) as session:
            first = session.execute(text("SELECT txid_current()")).scalar_one()
            second = session.execute(text("SELECT txid_current()")).scalar_one()
            assert first == second


@pg_only
def test_connections_the_server_ended_are_replaced_on_checkout(own_engine: Engine, engine: Engine) -> None:
    """A restarted server (here: its sessions terminated) costs no caller an error: the pool
    finds the dead connections on checkout, without a round trip, and opens new ones."""
    with own_engine.connect() as a, own_engine.connect() as b:
        pids = {
            int(a.execute(text("SELECT pg_backend_pid()")).scalar_one()),
            int(b.execute(text("SELECT pg_backend_pid()")).scalar_one()),
        }
        a.rollback()
        b.rollback()
    assert len(pids) == 2
    with read_scope(engine) as admin:
        for pid in pids:
            assert admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
        deadline = time.monotonic() + 10
        while admin.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"), {"pids": list(pids)}
        ).scalar_one():
            assert time.monotonic() < deadline, "the terminated sessions did not end"
            time.sleep(0.05)
    seen = {_backend_pid(own_engine) for _ in range(4)}
    with session_scope(own_engine) as session:
        seen.add(int(session.execute(text("SELECT pg_backend_pid()")).scalar_one()))
    assert not seen & pids


@pg_only
def test_the_checkout_test_works_past_select_s_descriptor_limit(settings: Settings, engine: Engine) -> None:
    """A busy API process holds many sockets: a pooled connection's descriptor may be past
    FD_SETSIZE (1024), where select() fails; the checkout test must still tell it usable."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f"the open-files limit ({soft}) leaves no room past 1024")
    null = os.open(os.devnull, os.O_RDONLY)
    spare = [os.dup(null) for _ in range(1100)]
    try:
        high = make_engine(settings.effective_database_url, pool_size=1)
        try:
            first = _backend_pid(high)
            assert _backend_pid(high) == first  # the same connection, found usable on checkout
        finally:
            high.dispose()
    finally:
        for fd in (null, *spare):
            os.close(fd)
