"""Engine construction for SQLite and PostgreSQL, and migrations."""

from __future__ import annotations

import logging
import select
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError
from sqlmodel import Session

from core.errors import Unavailable

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """Build an engine; SQLite gets WAL, a busy timeout and write-locking transactions.

    Every SQLite transaction starts with BEGIN IMMEDIATE: several processes (API, worker) write
    the same file, and a deferred transaction that upgrades to a write lock fails at once
    instead of waiting its turn.
    """
    parsed = make_url(url)
    if parsed.drivername.startswith("postgresql") and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if parsed.drivername.startswith("sqlite"):
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=pool_size
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if make_url(url).get_driver_name() != "psycopg":
        return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=20)
    engine = create_engine(url, pool_size=pool_size, max_overflow=20)

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if not _idle_connection_usable(dbapi_connection):
            # The pool discards the connection and checks out another (a new one if need be).
            raise DisconnectionError("the database closed this pooled connection")

    return engine


def _idle_connection_usable(dbapi_connection: Any) -> bool:
    """Whether a pooled psycopg connection is still open, without a round trip.

    What pool_pre_ping's `SELECT 1` finds out, it finds out from the socket: a server that
    ends a session (restart, pg_terminate_backend, idle timeout) sends its FATAL error and
    closes, so the idle connection's socket turns readable, and nothing else makes it so here
    (signgate never LISTENs, and every result is read to the end before the connection goes
    back to the pool). Saves a round trip on every checkout: the API checks one out per
    authenticated call.
    """
    import psycopg

    if dbapi_connection.closed or dbapi_connection.broken:
        return False
    pgconn = dbapi_connection.pgconn
    try:
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            return False
        if pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            return False
        # poll, not select: a busy API process may hold descriptors past select's limit.
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN)
        events = poller.poll(0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not events


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and maps a lost database to 503."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            if _is_connectivity_error(exc):
                raise Unavailable("the database is unreachable") from exc
            raise
        except BaseException:
            session.rollback()
            raise


@contextmanager
def read_scope(engine: Engine) -> Iterator[Connection]:
    """A connection for reads that need no transaction of their own (each a single statement).

    On PostgreSQL it runs in autocommit: every statement is its own snapshot, as a one-statement
    transaction would be, without the BEGIN and ROLLBACK round trips around it. SQLite keeps its
    transaction (its connections begin with the writers' lock, see make_engine). A lost
    database maps to 503, as in session_scope.
    """
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn
            conn.rollback()
    except SQLAlchemyError as exc:
        if _is_connectivity_error(exc):
            raise Unavailable("the database is unreachable") from exc
        raise


def _is_connectivity_error(exc: SQLAlchemyError) -> bool:
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def check_database(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.rollback()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> None:
    """Apply every Alembic migration (idempotent; safe to run from several processes in turn)."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")
