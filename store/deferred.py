"""The audit events' filter indexes on SQLite, filed a little after the sign path's commits.

Migration 0004 made the four filter indexes of `audit_events` (entity, actor, action, request)
partial, `WHERE indexed = 1`. The SQLite sign path (`store.fastsign`, through a `SignBatcher`)
writes its events with `indexed = 0`: each of its transactions, one every few hundred
microseconds under load, then writes four index pages fewer. `file_all` puts them into the
indexes in bulk, from a `Filer` thread in each API process: once a second, when it starts (what
a process that stopped without filing left) and when it stops.

The invariant: every event with `indexed = 0` has a seq past the mark in `index_marks`.
`file_pending` sets `indexed = 1` on the events past the mark up to a bound and moves the mark
to that bound, in one transaction; a new event always gets a seq past the audit head. So a
filtered query is `filter AND indexed = 1` (through the partial indexes) or `filter AND
indexed = 0 AND seq > mark` (through the seq index, over the few pending events): `visible`
builds it. PostgreSQL keeps full indexes and its sign path writes `indexed = 1`; the clause is
only added on SQLite.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from typing import Any

from sqlalchemy import Engine, literal_column, select, union_all
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col

from store.fastsign import SqliteDatabase
from store.models import AuditEvent, IndexMark

log = logging.getLogger(__name__)

EVENTS = "audit_events"

_MARK = "SELECT value FROM index_marks WHERE name = 'audit_events'"
_TOP = "SELECT COALESCE(MAX(seq), 0) FROM audit_events"
_FILE = "UPDATE audit_events SET indexed = 1 WHERE seq > ? AND seq <= ? AND indexed = 0"
_MOVE = "UPDATE index_marks SET value = ? WHERE name = 'audit_events'"
CHUNK = 2_000  # events past the mark filed by one transaction, at most


def file_pending(conn: sqlite3.Connection, chunk: int = CHUNK) -> tuple[int, bool]:
    """File the pending audit events of the next `chunk` past the mark into the filter indexes,
    in one write transaction on an autocommit connection: (how many, whether more are left)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute(_MARK).fetchone()
        if found is None:  # a database from before migration 0004
            conn.execute("ROLLBACK")
            return 0, False
        mark, top = int(found[0]), int(conn.execute(_TOP).fetchone()[0])
        upto = min(top, mark + chunk)
        filed = 0
        if upto > mark:
            filed = conn.execute(_FILE, (mark, upto)).rowcount
            conn.execute(_MOVE, (upto,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return filed, upto < top


def file_all(conn: sqlite3.Connection, lock_fd: int | None) -> int:
    """Every pending audit event filed, a chunk per transaction, each under the sign writers'
    lock (`lock_fd`, a flock: a sign batch waits for one chunk at most, never in SQLite's busy
    handler); the number filed."""
    total, more = 0, True
    while more:
        if lock_fd is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            filed, more = file_pending(conn)
        finally:
            if lock_fd is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
        total += filed
    return total


class Filer:
    """Files the pending audit events once a second (`file_all`), from a thread of its own, and
    once more when closed. Every API process on SQLite runs one (`start_filer`), whether or not
    it signs: filing also moves the mark past the events other paths wrote, so the part of a
    filtered query read through the seq index stays about a second long."""

    def __init__(self, path: str, interval: float = 1.0) -> None:
        self.path = path
        self.lock_path = SqliteDatabase.lock_path_of(path)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-index-filer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._file(conn, lock_fd)  # what a process that stopped without filing left
            while not self._stop.wait(self.interval):
                self._file(conn, lock_fd)
            self._file(conn, lock_fd)
        finally:
            os.close(lock_fd)
            conn.close()

    @staticmethod
    def _file(conn: sqlite3.Connection, lock_fd: int) -> None:
        try:
            file_all(conn, lock_fd)
        except sqlite3.Error as exc:  # they stay pending, found by every query, filed next time
            log.warning("filing audit events into their indexes failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def start_filer(engine: Engine, interval: float = 1.0) -> Filer | None:
    """A `Filer` for an engine's SQLite database file; None elsewhere."""
    if engine.url.get_backend_name() != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return None
    return Filer(str(engine.url.database), interval)


def visible(session: Session, conditions: list[ColumnElement[bool]]) -> list[ColumnElement[bool]]:
    """Filters on audit events (`conditions`, on the filter indexes' columns), as the WHERE
    clause that finds filed and pending events alike on SQLite: the rows of `filter AND
    indexed = 1` (read through the partial indexes) and of `filter AND indexed = 0 AND seq >
    mark` (through the seq index); see the module's docstring. Unchanged on PostgreSQL."""
    if not conditions or session.get_bind().dialect.name != "sqlite":
        return conditions
    table = AuditEvent.__table__  # type: ignore[attr-defined]
    rowid: ColumnElement[Any] = literal_column("audit_events.rowid")
    mark = select(IndexMark.value).where(col(IndexMark.name) == EVENTS).scalar_subquery()
    # Each branch reads audit_events on its own (no correlation with the outer query).
    filed = select(rowid).select_from(table).where(*conditions, col(AuditEvent.indexed) == 1).correlate(None)
    pending = (
        select(rowid)
        .select_from(table)
        .where(*conditions, col(AuditEvent.indexed) == 0, col(AuditEvent.seq) > mark)
        .correlate(None)
    )
    return [rowid.in_(union_all(filed, pending))]
