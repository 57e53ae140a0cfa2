"""The sign path on a plain DB-API connection, one transaction for a whole batch of calls.

Every sign call, from the API or from an activity, goes through `run_batch`: the rules live
here and in `store.signing` (input decoding, the signer's state), nowhere else.

A batch runs in two phases on one connection:

1. Reads, no write lock: each call's token is looked up (so a revoked or expired token fails on
   the very next call, from any process), then its scope, the signer with its certificate and
   the caller's membership, the input, the signer's state and, under a policy, whether a grant
   could serve it. A token or a signer read for one call of the batch is not read again for
   the next (they share one instant); on PostgreSQL the caller and the signer come back in one
   statement. The API's batcher keeps those rows across batches while the security epoch
   (migration 0003, bumped by triggers on any change to them) stands still (`ReadCache`).
   Calls that pass are signed now, outside the write lock, so the processes of one API never
   queue behind each other's RSA signatures.
2. One write transaction: the calls for one signer and caller take their grant operations
   together, from the grant that ends first, then the next (no grant is ever overspent,
   whatever runs concurrently: SQLite holds its write lock, BEGIN IMMEDIATE; PostgreSQL locks
   the grants FOR UPDATE in one order); a call that finds nothing left is denied and its
   signature discarded; every recorded attempt gets its signing-operation row, then the audit
   chain is advanced once for the batch, one event per attempt in order. On PostgreSQL this is
   one statement in autocommit, `signgate_record_sign_batch` (migration 0002), which settles,
   writes, hashes the chain and commits on the server, so no lock is held across a round trip.
   Only after COMMIT does any caller get an answer.

Refusals that are not the caller's input (disabled signer, no grant, failed signature) are
recorded as operations; bad input and authentication or membership refusals change nothing.
Should the batch transaction fail, its calls are retried one transaction each, so one call
cannot fail the others.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import Engine

from core.errors import (
    ApprovalRequired,
    BadRequest,
    Forbidden,
    NotFound,
    SigngateError,
    Unauthorized,
    Unavailable,
)
from core.ids import time_ordered_id
from core.metrics import SIGN_OPERATIONS
from core.timeutil import as_utc, rfc3339, utcnow
from store import audit
from store.identities import hash_token, token_shaped, token_usable
from store.signing import (
    CachingKeyStore,
    SignerKey,
    SigningFailed,
    SignResult,
    decode_sign_data,
    signer_refusal,
)

log = logging.getLogger(__name__)

SIGN_SCOPE = "codesign:sign"
MAX_BATCH = 128
# SQLite: how long a batch ready to write retries the writers' lock on the event loop before a
# thread waits for it (see `SignBatcher._write_when_free`).
SPIN_SECONDS = 0.002

_UNAUTHORIZED = "a valid bearer token is required"


# ------------------------------------------------------------------------------------- SQL

_CALLER_COLUMNS = "t.token_hash, t.scopes, t.expires_at, t.revoked_at, i.id, i.name"
_CALLER_FROM = "FROM api_tokens t JOIN identities i ON i.id = t.identity_id"
_CALLER = f"SELECT {_CALLER_COLUMNS} {_CALLER_FROM} WHERE t.token_hash = :token_hash"
_USABLE_GRANT = """
signer_id = :signer_id AND identity_id = :identity_id AND status = 'active'
AND valid_from <= :now AND valid_until > :now AND used_sign_operations < allowed_sign_operations
"""
_GRANT_CANDIDATE = f"SELECT id FROM grants WHERE {_USABLE_GRANT} ORDER BY valid_until, id LIMIT 1"  # noqa: S608
# The signer, its certificate, the caller's membership and whether a grant could serve the call,
# in one round trip.
_SIGNER_COLUMNS = f"""
s.id, s.name, s.status, s.signing_policy_id, c.id, c.status, c.key_algorithm,
c.sealed_key, c.not_before, c.not_after,
(SELECT 1 FROM signer_members m WHERE m.signer_id = s.id AND m.identity_id = :identity_id),
({_GRANT_CANDIDATE})
"""  # noqa: S608
_SIGNER_FROM = "signers s JOIN certificates c ON c.id = s.certificate_id"
_SIGNER = f"SELECT {_SIGNER_COLUMNS} FROM {_SIGNER_FROM} WHERE s.id = :signer_id"  # noqa: S608
# PostgreSQL: both of the above in one statement, the caller of the token standing in for
# :identity_id (the signer's columns are NULL when there is no such signer).
_CALLER_AND_SIGNER = f"""
SELECT {_CALLER_COLUMNS}, {_SIGNER_COLUMNS.replace(":identity_id", "i.id")}
{_CALLER_FROM} LEFT JOIN ({_SIGNER_FROM}) ON s.id = :signer_id
WHERE t.token_hash = :token_hash
"""
# Grouped consumption (`_take`): the calls of one batch for the same signer and caller take
# their operations together, one grant at a time, read with what it has left, then updated
# under the same conditions plus "enough left".
_GRANT_LEFT = "SELECT id, request_id, allowed_sign_operations - used_sign_operations FROM grants"
_CANDIDATE_LEFT = f"{_GRANT_LEFT} WHERE {_USABLE_GRANT} ORDER BY valid_until, id LIMIT 1"
_PINNED_LEFT = f"{_GRANT_LEFT} WHERE id = :grant_id AND {_USABLE_GRANT}"
# Only the count changes: the status (an indexed column) is set apart, by the one take that
# spends a grant's last operation (`_EXHAUSTED`), in the same transaction. Both return the
# grant, its request and what it has left; no row when it has not enough.
_TAKE = f"""
UPDATE grants SET used_sign_operations = used_sign_operations + :take
WHERE id = :grant_id AND {_USABLE_GRANT} AND used_sign_operations + :take <= allowed_sign_operations
RETURNING id, request_id, allowed_sign_operations - used_sign_operations
"""  # noqa: S608
# The usual case in one statement: the grant that ends first has enough for the whole group.
_TAKE_FIRST = f"""
UPDATE grants SET used_sign_operations = used_sign_operations + :take
WHERE id = ({_GRANT_CANDIDATE}) AND used_sign_operations + :take <= allowed_sign_operations
RETURNING id, request_id, allowed_sign_operations - used_sign_operations
"""  # noqa: S608
_EXHAUSTED = "UPDATE grants SET status = 'exhausted' WHERE id = :grant_id"
# PostgreSQL (`_commit_pipelined`): the whole write side of a batch in one statement, run in
# autocommit so it commits as it returns (migration 0002 defines the function).
# With the security epoch the batch's reads were made at (migration 0003): a batch read at
# another epoch is not recorded, the function answers {"stale": true}.
_RECORD_BATCH = "SELECT signgate_record_sign_batch_at_epoch(:batch::jsonb, :at, :epoch)"
_EPOCH = "SELECT value FROM security_epoch WHERE id = 1"
_INSERT_OPERATION = """
INSERT INTO signing_operations (id, at, signer_id, actor_id, status, signing_algorithm, data_sha256,
    grant_id, request_id, client_metadata, ip_address, error)
VALUES (:id, :at, :signer_id, :actor_id, :status, :signing_algorithm, :data_sha256,
    :grant_id, :request_id, :client_metadata, :ip_address, :error)
"""
# SQLite, inside the write transaction (which already holds the database's write lock).
_READ_HEAD = "SELECT seq, hash FROM audit_head WHERE id = 1"
_SET_HEAD = "UPDATE audit_head SET seq = :seq, hash = :hash WHERE id = 1"
_INSERT_EVENT = """
INSERT INTO audit_events (id, seq, at, actor_id, actor_name, action, entity_type, entity_id,
    request_id, data, ip_address, prev_hash, hash, indexed)
VALUES (:id, :seq, :at, :actor_id, :actor_name, :action, 'signing_operation', :entity_id,
    :request_id, :data, :ip_address, :prev_hash, :hash, :indexed)
"""
_STORE_SIGNATURE = "UPDATE signing_requests SET signature = :signature WHERE id = :request_id"

_NAMED = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")


@functools.lru_cache(maxsize=64)
def _pyformat(sql: str) -> str:
    return _NAMED.sub(r"%(\1)s", sql)


# ---------------------------------------------------------------------------- connections


class Database(Protocol):
    """The few things a batch needs from a connection, whichever the database."""

    def rows(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]: ...
    def execute(self, sql: str, params: dict[str, Any]) -> None: ...
    def execute_many(self, sql: str, params: Sequence[dict[str, Any]]) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def time(self, value: datetime | None) -> Any: ...
    def read_time(self, value: Any) -> datetime | None: ...
    def read_json(self, value: Any) -> Any: ...


class SqliteDatabase:
    """sqlite3 in autocommit mode: reads outside transactions, writes under BEGIN IMMEDIATE.

    `lock_path` names a file whose flock serialises this module's writers across processes:
    SQLite's own busy handler sleeps and retries, which under contention stretches the tail
    latency to hundreds of milliseconds, while flock waiters are woken as soon as it is free.
    """

    def __init__(self, conn: sqlite3.Connection, lock_path: str | None = None) -> None:
        self.conn = conn
        self._time_memo: tuple[datetime | None, Any] = (None, None)
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600) if lock_path else None
        self._locked = False
        # Audit events written with `indexed = 0`, for the process's `store.deferred.Filer`
        # to file (the connections of a `SignBatcher`, which runs in an API process).
        self.defer_indexes = False
        # Row -> what `authenticate` and `_load` make of it (times and JSON parsed): a pure
        # function of the row's values, so a row read again, changed or not, is never misread.
        self.parsed: dict[tuple[Any, ...], Any] = {}

    @classmethod
    def open(cls, path: str) -> SqliteDatabase:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "foreign_keys=ON"):
            conn.execute(f"PRAGMA {pragma}")
        return cls(conn, lock_path=cls.lock_path_of(path))

    @staticmethod
    def lock_path_of(path: str) -> str:
        """The file whose flock the sign path's writers of the database at `path` share."""
        return path + ".sign-lock"

    def rows(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: dict[str, Any]) -> None:
        self.conn.execute(sql, params)

    def execute_many(self, sql: str, params: Sequence[dict[str, Any]]) -> None:
        self.conn.executemany(sql, params)

    def no_autocheckpoint(self) -> None:
        """Leave checkpoints to a `WalCheckpointer`: this connection's commits never run one."""
        self.conn.execute("PRAGMA wal_autocheckpoint=0")

    def try_lock(self) -> bool:
        """Take the writers' lock now if it is free (the next write transaction then keeps it)."""
        if self._lock_fd is None or self._locked:
            return True
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._locked = True
        return True

    def wait_until_free(self) -> None:
        """Block until no other writer holds the writers' lock (without keeping it)."""
        if self._lock_fd is not None and not self._locked:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def unlock(self) -> None:
        """Let go of the writers' lock, if held (a batch that wrote nothing may still hold it)."""
        self._unlock()

    def begin_write(self) -> None:
        if self._lock_fd is not None and not self._locked:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._locked = True
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._unlock()
            raise

    def commit(self) -> None:
        try:
            self.conn.execute("COMMIT")
        finally:
            self._unlock()

    def rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._locked and self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._locked = False

    def close(self) -> None:
        self.conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def time(self, value: datetime | None) -> Any:
        # The text SQLAlchemy stores for a UTC datetime, so comparisons in SQL stay textual.
        # A batch formats its one `now` many times: the last answer is kept.
        if value is None:
            return None
        last, text = self._time_memo
        if last is not value:
            text = as_utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")
            self._time_memo = (value, text)
        return text

    def read_time(self, value: Any) -> datetime | None:
        if value is None:
            return None
        return as_utc(datetime.fromisoformat(value))

    def read_json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value


class WalCheckpointer:
    """Checkpoints a SQLite database's WAL from a thread of its own, so the sign path's commits
    never do it: a connection that commits past `wal_autocheckpoint` pages copies the WAL into
    the database file and syncs it in that commit, a stall of milliseconds for the calls of its
    batch. The sign path's connections turn that off (`no_autocheckpoint`); this thread runs a
    PASSIVE checkpoint (it waits for no reader or writer) every `interval` seconds in which
    something was committed. Other connections keep SQLite's default.

    Under a steady stream of commits the WAL never starts over: a writer restarts it only if
    its transaction began with every frame already copied, and with commits every few hundred
    microseconds a checkpoint never finishes before the next one begins. It then grows without
    end (seen here: 550 MB in a minute of signing). So once the WAL holds more than
    `CATCH_UP_FRAMES` frames, the next checkpoint runs holding the sign writers' lock
    (`lock_path`): only the frames appended since the last one are left to copy, and the next
    sign writer starts the WAL over from its beginning. Sign writes wait for that short
    checkpoint, a few times a minute under full load."""

    CATCH_UP_FRAMES = 8192  # 32 MB of 4 KB pages

    def __init__(self, path: str, interval: float = 0.1, *, lock_path: str | None = None) -> None:
        self.path = path
        self.interval = interval
        self.lock_path = lock_path
        self.dirty = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sign-wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600) if self.lock_path else None
        try:
            behind = False
            while not self._stop.wait(self.interval):
                if self.dirty:  # an idle database is left alone, long WAL or not
                    self.dirty = False
                    behind = self._round(conn, lock_fd, catch_up=behind)
            self.checkpoint(conn)
        finally:
            conn.close()
            if lock_fd is not None:
                os.close(lock_fd)

    def _round(self, conn: sqlite3.Connection, lock_fd: int | None, *, catch_up: bool) -> bool:
        """One checkpoint, under the writers' lock if `catch_up`; whether the WAL is still long
        (the next round, once something was committed, then catches up; a WAL just copied in
        full is started over by the next writer, whichever it is)."""
        if catch_up and lock_fd is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                frames, _ = self.checkpoint(conn)
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
        else:
            frames, _ = self.checkpoint(conn)
        return frames > self.CATCH_UP_FRAMES

    @staticmethod
    def checkpoint(conn: sqlite3.Connection) -> tuple[int, int]:
        """A PASSIVE checkpoint: (frames in the WAL, frames copied), (0, 0) if it failed."""
        try:
            row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # the next round tries again; commits are unaffected
            log.warning("WAL checkpoint failed: %s", exc)
            return 0, 0
        return (int(row[1]), int(row[2])) if row and row[1] >= 0 else (0, 0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class PostgresDatabase:
    """psycopg: the reads before signing, then the write side in one statement."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @classmethod
    def open(cls, conninfo: str) -> PostgresDatabase:
        import psycopg

        # Autocommit: the reads before signing hold no transaction open while the batch signs,
        # and the write side is one statement that commits as it returns.
        return cls(psycopg.connect(conninfo, autocommit=True))

    def rows(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(_pyformat(sql), params)
            return cast(list[tuple[Any, ...]], cur.fetchall())

    def execute(self, sql: str, params: dict[str, Any]) -> None:
        with self.conn.cursor() as cur:
            cur.execute(_pyformat(sql), params)

    def execute_many(self, sql: str, params: Sequence[dict[str, Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(_pyformat(sql), params)

    def rows_pipelined(
        self, queries: Sequence[tuple[str, Sequence[dict[str, Any]]]]
    ) -> list[list[list[tuple[Any, ...]]]]:
        """Each query once per parameter set, all sent together in pipeline mode: one round trip."""
        sent: list[list[Any]] = []
        try:
            with self.conn.pipeline():
                for sql, params in queries:
                    query = _pyformat(sql)
                    cursors = []
                    for one in params:
                        cur = self.conn.cursor()
                        cur.execute(query, one)
                        cursors.append(cur)
                    sent.append(cursors)
            return [[cast(list[tuple[Any, ...]], cur.fetchall()) for cur in cursors] for cursors in sent]
        finally:
            for cursors in sent:
                for cur in cursors:
                    cur.close()

    def record_batch(self, batch: str, at: datetime, epoch: int | None) -> dict[str, Any]:
        """`_RECORD_BATCH`: one round trip, COMMIT included, in autocommit (the sign path's own
        connections); on a connection in a transaction, COMMIT follows."""
        found = self.rows(_RECORD_BATCH, {"batch": batch, "at": at, "epoch": epoch})
        if not self.conn.autocommit:
            self.conn.commit()
        return cast(dict[str, Any], self.read_json(found[0][0]))

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()

    def time(self, value: datetime | None) -> Any:
        return value

    def read_time(self, value: Any) -> datetime | None:
        return None if value is None else as_utc(value)

    @staticmethod
    def read_json(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value


class RoundTripNeeded(Exception):
    """Phase 1 on the event loop (`NoRoundTrips`) met a read the `ReadCache` does not hold."""


class NoRoundTrips(PostgresDatabase):
    """Phase 1 of a PostgreSQL batch on the event loop: every read must come from the
    `ReadCache`; any statement raises RoundTripNeeded (the batch then goes to a thread)."""

    def __init__(self) -> None:
        super().__init__(None)

    def rows(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        raise RoundTripNeeded

    def execute(self, sql: str, params: dict[str, Any]) -> None:
        raise RoundTripNeeded

    def execute_many(self, sql: str, params: Sequence[dict[str, Any]]) -> None:
        raise RoundTripNeeded

    def rows_pipelined(
        self, queries: Sequence[tuple[str, Sequence[dict[str, Any]]]]
    ) -> list[list[list[tuple[Any, ...]]]]:
        raise RoundTripNeeded

    def record_batch(self, batch: str, at: datetime, epoch: int | None) -> dict[str, Any]:
        raise RoundTripNeeded

    def commit(self) -> None:
        raise RoundTripNeeded

    def rollback(self) -> None:
        raise RoundTripNeeded

    def close(self) -> None:
        pass


class StaleReads(Exception):
    """Nothing was recorded: the batch's cached reads are from an older security epoch."""


class ReadCache:
    """The token and signer rows one API process last read, kept across batches while the
    security epoch (migration 0003) stands still.

    Triggers bump the epoch in the same transaction as any change to tokens, identities,
    signers, certificates or memberships. The write side compares the epoch the batch's reads
    stand for with the database's, and records nothing if it moved (StaleReads): on SQLite one
    short query inside the write transaction, under the writers' lock; on PostgreSQL inside the
    statement that records the batch. The batch is then read and signed again. A batch that
    refuses a call from cached reads (a refusal is never recorded) reads the epoch first, and
    prepares again from fresh reads if it moved. Either way a revoked token, an expired one
    (checked against each batch's own instant), a removed member or a disabled signer is
    refused from the first batch recorded after the change, as when every batch read the rows.

    A signer row also says whether the caller had a usable grant, which changes without the
    epoch: a cached row is taken to say yes (the write side settles it, under lock), except for
    a signer and caller whose last batch was denied for want of one: those are read afresh, so
    a caller without a grant is refused before anything is signed.
    """

    LIMIT = 10_000

    def __init__(self) -> None:
        self.epoch: int | None = None
        self._rows: dict[tuple[str, tuple[Any, ...]], list[tuple[Any, ...]]] = {}
        self._no_grant: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def at(self, epoch: int) -> None:
        """The epoch a batch just read: a newer one forgets everything read before it."""
        with self._lock:
            if self.epoch is None or epoch > self.epoch:
                self._rows.clear()
                self._no_grant.clear()
                self.epoch = epoch

    def forget(self) -> None:
        with self._lock:
            self._rows.clear()
            self._no_grant.clear()
            self.epoch = None

    def get(self, epoch: int | None, key: tuple[str, tuple[Any, ...]]) -> list[tuple[Any, ...]] | None:
        with self._lock:
            if epoch is None or epoch != self.epoch:
                return None
            found = self._rows.get(key)
            if found is None or key[0] != _SIGNER or not found:
                return found
            if _pair(key) in self._no_grant:
                return None
        # Taken to have a usable grant in sight (see above).
        return [(*found[0][:11], 1, *found[0][12:])]

    def store(self, epoch: int | None, key: tuple[str, tuple[Any, ...]], rows: list[tuple[Any, ...]]) -> None:
        """Rows read at `epoch`, kept only if that is still the cache's epoch."""
        with self._lock:
            if epoch is None or epoch != self.epoch:
                return
            if len(self._rows) >= self.LIMIT:
                self._rows.clear()
            if key[0] == _SIGNER and rows and rows[0][3] is not None:  # under a policy
                if rows[0][11] is None:
                    self._no_grant.add(_pair(key))
                else:
                    self._no_grant.discard(_pair(key))
            self._rows[key] = rows

    def denied(self, attempts: Sequence[_Attempt]) -> None:
        """Note the signers and callers refused for want of a grant: read them afresh next time."""
        with self._lock:
            for attempt in attempts:
                if attempt.status == "denied" and isinstance(attempt.refusal, ApprovalRequired):
                    self._no_grant.add((attempt.key.signer_id, attempt.actor.id or ""))


def _pair(key: tuple[str, tuple[Any, ...]]) -> tuple[str, str]:
    """The (signer, caller) of a cached signer read."""
    params = dict(key[1])
    return str(params["signer_id"]), str(params["identity_id"])


class _BatchReads:
    """Phase 1's reads of callers and signers, each asked once per batch, and across batches
    from a `ReadCache` when one is given (with the epoch this batch read).

    The calls of one batch share one instant (`now`), so the same token or the same signer and
    caller read twice would read the same; on PostgreSQL they are fetched ahead, in pipelines.
    Every other statement goes to the connection.
    """

    MEMO = frozenset({_CALLER, _SIGNER})

    def __init__(self, db: Database, cache: ReadCache | None = None, epoch: int | None = None) -> None:
        self.db = db
        self.cache = cache
        self.epoch = epoch
        # Reads may come from the cache at an epoch not checked yet (PostgreSQL: no rows were
        # read for this batch; SQLite: the epoch was not read).
        self.from_cache = False
        self.answers: dict[tuple[str, tuple[Any, ...]], list[tuple[Any, ...]]] = {}

    @staticmethod
    def key(sql: str, params: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
        """A read's key, in the batch and in the cache: its statement and parameters but the
        instant (every call of a batch reads at the batch's one instant)."""
        return sql, tuple(sorted((k, v) for k, v in params.items() if k != "now"))

    def remember(self, sql: str, params: dict[str, Any], rows: list[tuple[Any, ...]]) -> None:
        self._keep(self.key(sql, params), rows)

    def _keep(self, key: tuple[str, tuple[Any, ...]], rows: list[tuple[Any, ...]]) -> None:
        self.answers[key] = rows
        if self.cache is not None:
            self.cache.store(self.epoch, key, rows)

    def rows(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        if sql not in self.MEMO:
            return self.db.rows(sql, params)
        key = self.key(sql, params)
        found = self.answers.get(key)
        if found is None and self.cache is not None:
            found = self.cache.get(self.epoch, key)
            if found is not None:
                self.answers[key] = found
        if found is None:
            found = self.db.rows(sql, params)
            self._keep(key, found)
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def _prefetch(
    db: PostgresDatabase,
    calls: Sequence[SignCall],
    now: datetime,
    cache: ReadCache | None,
    *,
    fresh: bool = False,
) -> _BatchReads:
    """Phase 1's token and signer reads for every call of the batch, in one round trip, unless
    the cache holds them all (and `fresh` is not asked for)."""
    ahead = _BatchReads(db, cache, cache.epoch if cache is not None else None)
    hashes = {call.token: hash_token(call.token) for call in calls if call.token and token_shaped(call.token)}
    wanted = [
        {"signer_id": signer_id, "token_hash": digest, "now": now}
        for signer_id, digest in {
            (call.signer_id, hashes[call.token]) for call in calls if call.token in hashes
        }
    ]
    if not wanted:
        return ahead
    if cache is not None and not fresh and all(_cached(ahead, params) for params in wanted):
        ahead.from_cache = True
        return ahead
    if cache is None:
        answers = (
            [db.rows(_CALLER_AND_SIGNER, wanted[0])]
            if len(wanted) == 1
            else db.rows_pipelined([(_CALLER_AND_SIGNER, wanted)])[0]
        )
    else:
        # The epoch first: the rows are then at least as new as the epoch they are kept under.
        epoch_rows, answers = db.rows_pipelined([(_EPOCH, [{}]), (_CALLER_AND_SIGNER, wanted)])
        ahead.epoch = int(epoch_rows[0][0][0])
        cache.at(ahead.epoch)
    for params, rows in zip(wanted, answers, strict=True):
        ahead.remember(_CALLER, {"token_hash": params["token_hash"]}, [row[:6] for row in rows])
        if rows:
            signer = [rows[0][6:]] if rows[0][6] is not None else []
            key = {"signer_id": params["signer_id"], "identity_id": rows[0][4], "now": db.time(now)}
            ahead.remember(_SIGNER, key, signer)
    return ahead


def _cached(reads: _BatchReads, params: dict[str, Any]) -> bool:
    """Whether the cache holds the caller and signer rows for one (signer, token) of a batch."""
    assert reads.cache is not None
    found = reads.cache.get(reads.epoch, _BatchReads.key(_CALLER, {"token_hash": params["token_hash"]}))
    if found is None:
        return False
    if not found:
        return True
    signer_key = {"signer_id": params["signer_id"], "identity_id": found[0][4]}
    return reads.cache.get(reads.epoch, _BatchReads.key(_SIGNER, signer_key)) is not None


def open_database(engine: Engine) -> SqliteDatabase | PostgresDatabase:
    """A connection of this module's own to the engine's database (one per process or thread)."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ValueError("the sign path needs a SQLite database file")
        return SqliteDatabase.open(url.database)
    return PostgresDatabase.open(_conninfo(engine))


def is_connectivity_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, psycopg.OperationalError)


# ---------------------------------------------------------------------------------- calls


@dataclass
class SignCall:
    """One sign attempt. API calls carry a bearer token; activities a checked actor instead."""

    signer_id: str
    signing_algorithm: str
    data_b64: str
    is_digest: bool
    client_metadata: dict[str, Any] | None = None
    token: str | None = None
    ip_address: str | None = None
    actor: audit.Actor | None = None
    input_error: SigngateError | None = None  # reported once the caller is known to be allowed
    grant_id: str | None = None
    require_grant: bool | None = None
    store_signature_on_request: str | None = None
    producer: Callable[[Any], bytes] | None = None


@dataclass
class _Attempt:
    """A call that gets a signing-operation record, with what phase 1 decided for it."""

    index: int
    call: SignCall
    actor: audit.Actor
    key: SignerKey
    data_sha256: str
    needs_grant: bool
    operation_id: str = field(default_factory=time_ordered_id)
    signature: bytes | None = None
    refusal: SigngateError | None = None
    status: str = "denied"
    grant_id: str | None = None
    request_id: str | None = None


Outcome = SignResult | SigngateError
# Where a `SignBatcher` delivers one call's outcome, or the exception its batch failed with.
OutcomeSink = Callable[[Outcome | BaseException], None]


def authenticate(db: Database, token: str | None, now: datetime) -> tuple[audit.Actor, frozenset[str]]:
    """The caller of a token, looked up on this call; Unauthorized for unknown, expired, revoked."""
    if not token_shaped(token):
        raise Unauthorized(_UNAUTHORIZED)
    assert token is not None
    digest = hash_token(token)
    found = db.rows(_CALLER, {"token_hash": digest})
    if not found:
        raise Unauthorized(_UNAUTHORIZED)
    row = found[0]
    parsed = _parsed(db, row)
    if parsed is None:
        stored_hash, scopes, expires_at, revoked_at, identity_id, name = row
        parsed = _remember(
            db,
            row,
            (
                stored_hash,
                revoked_at,
                db.read_time(expires_at),
                audit.Actor(id=identity_id, name=name),
                frozenset(db.read_json(scopes)),
            ),
        )
    stored_hash, revoked_at, expires_at, actor, scopes = parsed
    if not token_usable(stored_hash, digest, revoked_at, expires_at, now):
        raise Unauthorized(_UNAUTHORIZED)
    return actor, scopes


def _parsed(db: Database, row: tuple[Any, ...]) -> Any:
    """What a SQLite connection made of this row before, if it did (see `SqliteDatabase.parsed`)."""
    memo: dict[tuple[Any, ...], Any] | None = getattr(db, "parsed", None)
    return None if memo is None else memo.get(row)


def _remember(db: Database, row: tuple[Any, ...], parsed: Any) -> Any:
    memo: dict[tuple[Any, ...], Any] | None = getattr(db, "parsed", None)
    if memo is not None:
        if len(memo) >= ReadCache.LIMIT:
            memo.clear()
        memo[row] = parsed
    return parsed


def _load(
    db: Database, call: SignCall, identity_id: str | None, now: datetime
) -> tuple[SignerKey, bool, bool]:
    """The signer's key, whether the identity is a member, whether a grant could serve it."""
    found = db.rows(
        _SIGNER, {"signer_id": call.signer_id, "identity_id": identity_id or "", "now": db.time(now)}
    )
    if not found:
        raise NotFound("no such signer")
    row = found[0]
    described = row[:10]
    key = _parsed(db, described)
    if key is None:
        key = _remember(
            db,
            described,
            SignerKey(
                signer_id=row[0],
                signer_name=row[1],
                status=row[2],
                signing_policy_id=row[3],
                certificate_id=row[4],
                certificate_status=row[5],
                key_algorithm=row[6],
                sealed_key=bytes(row[7]),
                not_before=db.read_time(row[8]),
                not_after=db.read_time(row[9]),
            ),
        )
    return key, row[10] is not None, row[11] is not None


_Resolved = tuple[audit.Actor, SignerKey, bool, bool]  # caller, signer key, member, grant in sight


def _prepare(
    db: Database,
    key_store: CachingKeyStore,
    call: SignCall,
    index: int,
    now: datetime,
    key_algorithms: dict[str, str] | None = None,
    resolved: dict[tuple[str | None, str], _Resolved] | None = None,
) -> _Attempt:
    """Phase 1 for one call: raise what is answered without a record, else the attempt to record.

    `resolved`: the batch's callers already authenticated and their signers loaded, by token and
    signer. The calls of one batch share one instant and one snapshot of the rows, so a second
    call with the same token to the same signer would read and decide the same; it takes the
    first one's answer instead (what is refused is not kept: it is decided again)."""
    from pki.errors import KeyDecryptionError, PkiError, SigningError
    from pki.signing import sign as pki_sign

    if call.actor is not None:
        actor = call.actor
        key, _, grant_in_sight = _load(db, call, actor.id, now)
    else:
        known = resolved.get((call.token, call.signer_id)) if resolved is not None else None
        if known is None:
            principal, scopes = authenticate(db, call.token, now)
            if SIGN_SCOPE not in scopes:
                raise Forbidden(f"this call needs the {SIGN_SCOPE} scope")
            key, member, grant_in_sight = _load(db, call, principal.id, now)
            if resolved is not None:
                resolved[(call.token, call.signer_id)] = (principal, key, member, grant_in_sight)
        else:
            principal, key, member, grant_in_sight = known
        if not member:
            raise Forbidden("the caller is not a member of this signer", code="not_member")
        actor = audit.Actor(id=principal.id, name=principal.name, ip_address=call.ip_address)
    if key_algorithms is not None:
        key_algorithms[key.signer_id] = key.key_algorithm
    if call.input_error is not None:
        raise call.input_error
    data = decode_sign_data(call.data_b64, call.signing_algorithm, key.key_algorithm, call.is_digest)
    needs_grant = key.signing_policy_id is not None if call.require_grant is None else call.require_grant
    attempt = _Attempt(
        index=index,
        call=call,
        actor=actor,
        key=key,
        data_sha256=hashlib.sha256(data).hexdigest(),
        needs_grant=needs_grant,
    )
    attempt.refusal = signer_refusal(key, now)
    # A read without locks: it only saves signing for a caller who certainly has no grant.
    if attempt.refusal is None and needs_grant and call.grant_id is None and not grant_in_sight:
        attempt.refusal = _approval_required()
    if attempt.refusal is not None:
        return attempt
    try:
        private_key = key_store.load_cached(key.certificate_id, key.sealed_key)
        if call.producer is not None:
            attempt.signature = call.producer(private_key)
        else:
            attempt.signature = pki_sign(private_key, call.signing_algorithm, data, is_digest=call.is_digest)
    except (SigningError, KeyDecryptionError) as exc:
        log.warning("signing failed for signer %s: %s", key.signer_name, exc.code)
        attempt.refusal = SigningFailed("the signature could not be produced")
    except PkiError as exc:
        # A request the producer (CMS) cannot serve: the caller's error, not the server's.
        attempt.refusal = BadRequest(exc.message, code=exc.code)
    except Exception:
        log.exception("signing failed for signer %s", key.signer_name)
        attempt.refusal = SigningFailed("the signature could not be produced")
    if attempt.refusal is not None:
        attempt.status = "failed"
    return attempt


def _approval_required() -> ApprovalRequired:
    return ApprovalRequired("an approved grant for this signer is required; open a signing request")


def _take(
    db: Database, signer_id: str, identity_id: str, pinned: str | None, wanted: int, now: Any
) -> list[tuple[str, str]]:
    """Up to `wanted` operations from the caller's usable grants: (grant id, request id) each.

    SQLite, inside the batch's write transaction (which holds the database's write lock): one
    statement takes the whole group from the grant that ends first if it has enough left (the
    usual case); otherwise the candidate is read with what it has left, then updated under the
    same conditions plus "enough left", so no grant is ever overspent.
    """
    params: dict[str, Any] = {"signer_id": signer_id, "identity_id": identity_id, "now": now}
    if pinned is not None:
        params["grant_id"] = pinned
    whole = db.rows(_TAKE if pinned is not None else _TAKE_FIRST, {**params, "take": wanted})
    if whole:
        grant_id, request_id, left = whole[0]
        if int(left) <= 0:
            db.execute(_EXHAUSTED, {"grant_id": grant_id})
        return [(str(grant_id), str(request_id))] * wanted
    # Not enough left in that grant: what it has, then the next one's.
    query = _PINNED_LEFT if pinned is not None else _CANDIDATE_LEFT
    taken: list[tuple[str, str]] = []
    misses = 0
    while len(taken) < wanted and misses < 5:
        found = db.rows(query, params)
        if not found:
            break
        grant_id, request_id, left = found[0]
        take = min(int(left), wanted - len(taken))
        left_after = db.rows(_TAKE, {**params, "grant_id": grant_id, "take": take}) if take > 0 else []
        if left_after:
            if int(left_after[0][2]) <= 0:
                db.execute(_EXHAUSTED, {"grant_id": grant_id})
            taken += [(str(grant_id), str(request_id))] * take
        else:
            misses += 1
    return taken


_GroupKey = tuple[str, str, str | None]  # signer, caller, pinned grant


def _grant_groups(attempts: Sequence[_Attempt]) -> dict[_GroupKey, list[_Attempt]]:
    """The attempts that need a grant operation, by signer, caller and pinned grant, in order.

    The others are settled here: a refusal names the grant it was pinned to (a failed
    signature consumed nothing), a call that needs no grant succeeds.
    """
    groups: dict[_GroupKey, list[_Attempt]] = {}
    for attempt in attempts:
        if attempt.refusal is not None:
            attempt.grant_id = attempt.call.grant_id if attempt.status == "denied" else None
            attempt.request_id = None
        elif not attempt.needs_grant:
            attempt.status, attempt.grant_id, attempt.request_id = "success", None, None
        else:
            key = (attempt.key.signer_id, attempt.actor.id or "", attempt.call.grant_id)
            groups.setdefault(key, []).append(attempt)
    return groups


def _settle(members: list[_Attempt], taken: list[tuple[str, str]], pinned: str | None) -> None:
    """The first len(taken) attempts of a group succeed on the operations taken; the rest are denied."""
    for position, attempt in enumerate(members):
        if position < len(taken):
            attempt.status = "success"
            attempt.grant_id, attempt.request_id = taken[position]
        else:
            attempt.signature = None
            attempt.refusal = _approval_required()
            attempt.status, attempt.grant_id, attempt.request_id = "denied", pinned, None


def _operation_rows(attempts: Sequence[_Attempt]) -> list[dict[str, Any]]:
    """The signing-operation records, but their time; client metadata as the caller's value."""
    return [
        {
            "id": a.operation_id,
            "signer_id": a.key.signer_id,
            "actor_id": a.actor.id or "system",
            "status": a.status,
            "signing_algorithm": a.call.signing_algorithm,
            "data_sha256": a.data_sha256,
            "grant_id": a.grant_id,
            "request_id": a.request_id,
            "client_metadata": a.call.client_metadata,
            "ip_address": a.actor.ip_address,
            "error": None if a.refusal is None else a.refusal.description,
        }
        for a in attempts
    ]


class _EventTexts:
    """Each attempt's audit event as `audit.event_hash` writes its canonical text, cut around the
    values only the write transaction settles (the action, the error, the grant id, the request
    id, the sequence number): `h` (actor and time), `d1` (the data after the grant id) and `q`
    (entity, event id and address). Built before the transaction; the pieces an actor or a
    signer share are made once. The PostgreSQL function (migration 0002) joins the same pieces
    the same way as `canonical`."""

    def __init__(self, attempts: Sequence[_Attempt], now: datetime) -> None:
        at_text = rfc3339(now)
        heads: dict[tuple[str | None, str | None], str] = {}
        afters: dict[tuple[str, str, str], str] = {}
        self.pieces: list[tuple[str, str, str, str]] = []  # event id, h, d1, q
        for attempt in attempts:
            actor, key, algorithm = attempt.actor, attempt.key, attempt.call.signing_algorithm
            head = heads.get((actor.id, actor.name))
            if head is None:
                head = heads[(actor.id, actor.name)] = _canonical(
                    {"actorId": actor.id, "actorName": actor.name, "at": at_text}
                )[1:-1]
            after_grant = afters.get((key.signer_id, key.signer_name, algorithm))
            if after_grant is None:
                after_grant = afters[(key.signer_id, key.signer_name, algorithm)] = (
                    ","
                    + _canonical(
                        {
                            "signerId": key.signer_id,
                            "signerName": key.signer_name,
                            "signingAlgorithm": algorithm,
                        }
                    )[1:]
                )
            event_id = time_ordered_id()
            after_data = {
                "entityId": attempt.operation_id,
                "entityType": "signing_operation",
                "id": event_id,
                "ipAddress": actor.ip_address,
            }
            self.pieces.append((event_id, head, after_grant, "," + _canonical(after_data)[1:-1]))

    @staticmethod
    def data(attempt: _Attempt, d1: str, error_json: str, grant_json: str) -> str:
        """The event's data, canonical: what the database stores and the hash covers."""
        return (
            '{"dataSha256":"'
            + attempt.data_sha256
            + '","error":'
            + error_json
            + ',"grantId":'
            + grant_json
            + d1
        )

    @staticmethod
    def canonical(action: str, h: str, data: str, q: str, request_json: str, seq: int) -> str:
        return (
            '{"action":"'
            + action
            + '",'
            + h
            + ',"data":'
            + data
            + q
            + ',"requestId":'
            + request_json
            + ',"seq":'
            + str(seq)
            + "}"
        )


def _event_rows(
    attempts: Sequence[_Attempt], texts: _EventTexts, head_seq: int, head_hash: str, at: Any, indexed: int = 1
) -> tuple[list[dict[str, Any]], str]:
    """SQLite: one audit event per attempt at `at` (the batch's instant, as its operations),
    chained in order after the head: the rows and the new head hash. `indexed` 0: left for
    `store.deferred` to file into the filter indexes."""
    seq, prev_hash = head_seq, head_hash
    json_of: dict[str | None, str] = {}  # error descriptions and ids, as JSON text
    events = []
    for attempt, (event_id, h, d1, q) in zip(attempts, texts.pieces, strict=True):
        seq += 1
        error = None if attempt.refusal is None else attempt.refusal.description
        error_json, grant_json, request_json = (
            json_of.get(value) or json_of.setdefault(value, _canonical(value))
            for value in (error, attempt.grant_id, attempt.request_id)
        )
        action = "signing_operation." + attempt.status
        data = _EventTexts.data(attempt, d1, error_json, grant_json)
        canonical = _EventTexts.canonical(action, h, data, q, request_json, seq)
        digest = hashlib.sha256((prev_hash + canonical).encode()).hexdigest()
        actor = attempt.actor
        events.append(
            {
                "id": event_id,
                "seq": seq,
                "at": at,
                "actor_id": actor.id,
                "actor_name": actor.name,
                "action": action,
                "entity_id": attempt.operation_id,
                "request_id": attempt.request_id,
                "data": data,
                "ip_address": actor.ip_address,
                "prev_hash": prev_hash,
                "hash": digest,
                "indexed": indexed,
            }
        )
        prev_hash = digest
    return events, prev_hash


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _signature_rows(attempts: Sequence[_Attempt]) -> list[dict[str, Any]]:
    rows = []
    for attempt in attempts:
        if attempt.status == "success" and attempt.call.store_signature_on_request is not None:
            assert attempt.signature is not None
            rows.append(
                {
                    "signature": base64.b64encode(attempt.signature).decode(),
                    "request_id": attempt.call.store_signature_on_request,
                }
            )
    return rows


def _write(db: SqliteDatabase, attempts: Sequence[_Attempt], now: datetime, texts: _EventTexts) -> None:
    """Phase 2 on SQLite, inside the caller's write transaction: statement by statement (each
    is a local call)."""
    at = db.time(now)
    for (signer_id, identity_id, pinned), members in _grant_groups(attempts).items():
        _settle(members, _take(db, signer_id, identity_id, pinned, len(members), at), pinned)
    db.execute_many(
        _INSERT_OPERATION,
        [
            {**row, "at": at, "client_metadata": _json_or_none(row["client_metadata"])}
            for row in _operation_rows(attempts)
        ],
    )
    # The audit head is the last row written (the transaction already holds the write lock).
    seq, head_hash = db.rows(_READ_HEAD, {})[0]
    indexed = 0 if db.defer_indexes else 1
    events, last_hash = _event_rows(attempts, texts, int(seq), str(head_hash), at, indexed)
    db.execute_many(_INSERT_EVENT, events)
    db.execute(_SET_HEAD, {"seq": int(seq) + len(attempts), "hash": last_hash})
    for row in _signature_rows(attempts):
        db.execute(_STORE_SIGNATURE, row)


def _outcome(attempt: _Attempt) -> Outcome:
    if attempt.refusal is not None:
        return attempt.refusal
    assert attempt.signature is not None
    return SignResult(
        signature=attempt.signature,
        signing_algorithm=attempt.call.signing_algorithm,
        signer_id=attempt.key.signer_id,
        grant_id=attempt.grant_id,
        operation_id=attempt.operation_id,
    )


def _read_epoch(db: Database) -> int:
    """SQLite: the security epoch as the connection sees it now."""
    return int(db.rows(_EPOCH, {})[0][0])


def _commit(
    db: Database,
    attempts: Sequence[_Attempt],
    now: datetime,
    epoch: int | None = None,
    texts: _EventTexts | None = None,
) -> None:
    """Phase 2 for `attempts`; on SQLite with their events' texts if made already (`texts`)."""
    if isinstance(db, PostgresDatabase):
        _commit_pipelined(db, attempts, now, epoch)
        return
    assert isinstance(db, SqliteDatabase)
    if texts is None:
        texts = _EventTexts(attempts, now)
    db.begin_write()
    try:
        # Reads from a `ReadCache` stand only while the epoch does (nothing recorded otherwise).
        if epoch is not None and _read_epoch(db) != epoch:
            raise StaleReads
        _write(db, attempts, now, texts)
        db.commit()
    except BaseException:
        db.rollback()
        raise


def _commit_pipelined(
    db: PostgresDatabase, attempts: Sequence[_Attempt], now: datetime, epoch: int | None
) -> None:
    """Phase 2 on PostgreSQL: one statement, `signgate_record_sign_batch`, that commits as it
    returns (autocommit).

    On the server, in one transaction: every usable grant of each group locked FOR UPDATE
    (groups in a fixed order, grants in the order they are spent, so concurrent batches lock
    them in one order; a row that stopped matching while it waited is left out), the operations
    settled and taken, the records inserted, the audit head advanced (the last lock) and the
    chained events inserted. The locks are held only while that statement runs: no round trip
    and no wait for this process's GIL falls inside them.

    Only after it has committed does any caller get an answer. With `epoch` (the reads came
    from a `ReadCache`), nothing is recorded if the security epoch has moved: StaleReads.
    """
    document, grouped = _batch_request(attempts, now)
    _settle_recorded(attempts, grouped, db.record_batch(document, now, epoch))


def _batch_request(attempts: Sequence[_Attempt], now: datetime) -> tuple[str, set[int]]:
    """The document `signgate_record_sign_batch` reads, and the attempts it settles (by id)."""
    groups = sorted(
        _grant_groups(attempts).items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or "")
    )
    grouped = {id(attempt) for _, members in groups for attempt in members}
    return _batch_document(attempts, groups, grouped, now), grouped


def _settle_recorded(attempts: Sequence[_Attempt], grouped: set[int], result: dict[str, Any]) -> None:
    """What the server settled for the attempts of `grouped`; StaleReads if it recorded nothing."""
    if result.get("stale"):
        raise StaleReads
    settled = zip(attempts, result["status"], result["grant"], result["request"], strict=True)
    for attempt, status, grant_id, request_id in settled:
        if id(attempt) in grouped:
            taken = [(str(grant_id), str(request_id))] if status == "success" else []
            _settle([attempt], taken, attempt.call.grant_id)


def _batch_document(
    attempts: Sequence[_Attempt],
    groups: Sequence[tuple[_GroupKey, list[_Attempt]]],
    grouped: set[int],
    now: datetime,
) -> str:
    """The batch as `signgate_record_sign_batch` reads it (see migration 0002): each attempt's
    operation row and event, with its event's canonical text (`audit.event_hash`) in the parts
    around what the server settles (the action, the error, the grant id, the request id and the
    sequence number)."""
    position = {id(attempt): index for index, attempt in enumerate(attempts)}
    texts = _EventTexts(attempts, now)
    documents = []
    for attempt, (event_id, head, after_grant, after_data) in zip(attempts, texts.pieces, strict=True):
        actor, key = attempt.actor, attempt.key
        operation: dict[str, Any] = {
            "id": attempt.operation_id,
            "signer_id": key.signer_id,
            "actor_id": actor.id or "system",
            "signing_algorithm": attempt.call.signing_algorithm,
            "data_sha256": attempt.data_sha256,
            "ip_address": actor.ip_address,
        }
        if attempt.call.client_metadata is not None:
            operation["client_metadata"] = json.dumps(attempt.call.client_metadata)
        document: dict[str, Any] = {
            "op": operation,
            "ev": {
                "id": event_id,
                "actor_id": actor.id,
                "actor_name": actor.name,
                "ip_address": actor.ip_address,
            },
            "h": head,
            "d1": after_grant,
            "q": after_data,
        }
        if id(attempt) not in grouped:
            error = None if attempt.refusal is None else attempt.refusal.description
            document["fixed"] = {
                "status": attempt.status,
                "grant_id": attempt.grant_id,
                "request_id": attempt.request_id,
                "error": error,
                "error_json": _canonical(error),
            }
        # Kept on the request only if the attempt succeeds.
        if attempt.call.store_signature_on_request is not None and attempt.signature is not None:
            document["sig_req"] = attempt.call.store_signature_on_request
            document["sig"] = base64.b64encode(attempt.signature).decode()
        documents.append(document)
    denied = _approval_required().description
    batch: dict[str, Any] = {
        "groups": [
            {
                "signer_id": signer_id,
                "identity_id": identity_id,
                "grant_id": pinned,
                "members": [position[id(attempt)] for attempt in members],
            }
            for (signer_id, identity_id, pinned), members in groups
        ],
        "attempts": documents,
        "denied": denied,
        "denied_json": _canonical(denied),
    }
    if any("sig_req" in document for document in documents):
        batch["signatures"] = True
    return _COMPACT.encode(batch)


# json.dumps with any non-default option builds an encoder per call; these are built once.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _canonical(value: Any) -> str:
    """A JSON value as `audit.event_hash` writes it (json.dumps with its options)."""
    return _CANONICAL.encode(value)


def run_batch(
    db: Database,
    key_store: CachingKeyStore,
    calls: Sequence[SignCall],
    key_algorithms: dict[str, str] | None = None,
) -> list[Outcome]:
    """Decide, sign and durably record a batch of calls; one outcome per call, in order.

    `key_algorithms`, when given, learns the key algorithm of each signer a call got as far as.

    Nothing is answered before the batch has committed. A database that cannot be reached
    makes every call of the batch 503; a batch the database refuses for another reason is
    retried one call per transaction.
    """
    return commit_batch(db, prepare_batch(db, key_store, calls, key_algorithms))


@dataclass
class PreparedBatch:
    """A batch after phase 1: the answers already known (refusals of input, identity or
    membership) and the attempts phase 2 records; or, if the database could not be read,
    the answer for every call."""

    now: datetime
    outcomes: list[Outcome | None]
    attempts: list[_Attempt]
    failed: BaseException | None = None
    epoch: int | None = None  # PostgreSQL: the security epoch its reads are from, if cached
    cache: ReadCache | None = None
    # SQLite: the attempts' audit texts, made before the write lock is taken (`_commit`).
    texts: _EventTexts | None = None


def prepare_batch(
    db: Database,
    key_store: CachingKeyStore,
    calls: Sequence[SignCall],
    key_algorithms: dict[str, str] | None = None,
    cache: ReadCache | None = None,
    *,
    fresh: bool = False,
) -> PreparedBatch:
    """Phase 1 of a batch: its reads and signatures, with no write lock taken.

    With a cache, reads from it are checked against the security epoch when the batch is
    recorded (on SQLite inside the write transaction, `_commit`; on PostgreSQL by the recording
    statement). A call refused here is never recorded, so a batch that refused one from cached
    reads is prepared again from fresh ones if the epoch has moved (a member just added is not
    refused). On SQLite the epoch is read here only when the cache has none, or for `fresh`."""
    now = utcnow()
    prepared = PreparedBatch(now=now, outcomes=[None] * len(calls), attempts=[], cache=cache)
    try:
        reads: _BatchReads
        if isinstance(db, PostgresDatabase):
            reads = _prefetch(db, calls, now, cache, fresh=fresh)
            prepared.epoch = reads.epoch
        elif cache is not None:
            epoch, unchecked = cache.epoch, True
            if epoch is None or fresh:
                epoch, unchecked = _read_epoch(db), False
                cache.at(epoch)
            reads = _BatchReads(db, cache, epoch)
            reads.from_cache = unchecked
            prepared.epoch = epoch
        else:
            reads = _BatchReads(db)
        resolved: dict[tuple[str | None, str], _Resolved] = {}
        for index, call in enumerate(calls):
            try:
                prepared.attempts.append(
                    _prepare(cast(Database, reads), key_store, call, index, now, key_algorithms, resolved)
                )
            except SigngateError as exc:
                prepared.outcomes[index] = exc
        if reads.from_cache and any(outcome is not None for outcome in prepared.outcomes):
            if isinstance(db, PostgresDatabase) or _read_epoch(db) != prepared.epoch:
                return prepare_batch(db, key_store, calls, key_algorithms, cache, fresh=True)
        if isinstance(db, SqliteDatabase) and prepared.attempts:
            prepared.texts = _EventTexts(prepared.attempts, now)
    except Exception as exc:
        prepared.failed = exc
    return prepared


def commit_batch(db: Database, prepared: PreparedBatch) -> list[Outcome]:
    """Phase 2 of a batch: record its attempts in one write transaction; then every answer.

    StaleReads (PostgreSQL, reads from a `ReadCache`): nothing was recorded and the cache is
    emptied; prepare the batch again."""
    outcomes, attempts, now = prepared.outcomes, prepared.attempts, prepared.now
    try:
        if prepared.failed is not None:
            raise prepared.failed
        # PostgreSQL reads opened a transaction; SQLite reads ran in autocommit.
        if not attempts:
            db.rollback()
            return cast(list[Outcome], outcomes)
        try:
            _commit(db, attempts, now, prepared.epoch, prepared.texts)
        except StaleReads:
            if prepared.cache is not None:
                prepared.cache.forget()
            raise
        except Exception as exc:
            if is_connectivity_error(exc) or len(attempts) == 1:
                raise
            log.warning("a sign batch of %d failed (%s); retrying one call at a time", len(attempts), exc)
            for attempt in attempts:
                try:
                    _commit(db, [attempt], now, prepared.epoch)
                except StaleReads:
                    # Others of the batch may be recorded already: this one alone is not.
                    attempt.signature = None
                    attempt.refusal = Unavailable("the signer's settings changed during the call; retry it")
                    attempt.status = "error"
                except Exception as single:
                    if is_connectivity_error(single):
                        raise
                    log.exception("recording a sign attempt failed")
                    attempt.signature = None
                    attempt.refusal = SigningFailed("the signature could not be recorded")
                    attempt.status = "error"
    except StaleReads:
        raise
    except Exception as exc:
        try:
            db.rollback()
        except Exception:  # noqa: S110 - the connection is being reported as lost anyway
            pass
        if not is_connectivity_error(exc):
            raise
        log.warning("sign batch: the database is unreachable: %s", exc)
        return _unreachable(prepared)
    return _answers(prepared)


@functools.cache
def _operations_counter(status: str) -> Any:
    """The sign operations counter of one status (a label lookup takes a lock each time)."""
    return SIGN_OPERATIONS.labels(status=status)


def _unreachable(prepared: PreparedBatch) -> list[Outcome]:
    """A batch whose write side could not reach the database: 503 for every call not yet answered."""
    unavailable = Unavailable("the database is unreachable")
    return [outcome if outcome is not None else unavailable for outcome in prepared.outcomes]


def _answers(prepared: PreparedBatch) -> list[Outcome]:
    """Every call's answer once the batch's attempts are recorded (and settled)."""
    outcomes = prepared.outcomes
    recorded: dict[str, int] = {}
    for attempt in prepared.attempts:
        if attempt.status != "error":
            recorded[attempt.status] = recorded.get(attempt.status, 0) + 1
        outcomes[attempt.index] = _outcome(attempt)
    for status, count in recorded.items():
        _operations_counter(status).inc(count)
    return cast(list[Outcome], outcomes)


# -------------------------------------------------------------------------- group commit


class SignBatcher:
    """Group commit for one API process: the calls that arrive while batches are being decided
    and committed share the next one.

    By default a batch runs on a thread of its own, with its own connection, so the event loop
    keeps reading and answering requests while a batch waits for the database or signs (the
    two exceptions follow). Up to `max_in_flight` batches run at once: while one holds the
    write lock or waits for its COMMIT, the next reads and signs (RSA signatures release the
    GIL, so they use the other core); their writes still queue on the database's lock, in
    order. By default 2 on SQLite and 3 on PostgreSQL, where a batch also waits for its round
    trips (measured with 2 processes, RSA-2048, 8 clients: with every batch on a thread, 3 gave
    about 5% more signatures per second than 2 or 4; with the asyncio path below, 3 and 6
    measured alike and 2 about 4% less; on SQLite 2 and 3 made no difference).

    On SQLite a batch whose calls all go to signers last seen with an EC key runs on the event
    loop instead, one at a time: an ECDSA signature and a local commit cost less than the hop to
    a thread and back. Its reads and signatures come first, without the writers' lock; only its
    write transaction needs the lock; if another process holds it, the batch retries it on the
    loop's next turns for up to `SPIN_SECONDS`, then waits for it on a thread.
    RSA signatures (about 250 µs each) go to the threads on SQLite. On SQLite a
    `WalCheckpointer` keeps WAL checkpoints out of the batches' commits.

    On PostgreSQL a batch whose reads all come from the `ReadCache` (the steady state: only the
    first batch after a change reads) is signed on the loop, EC or RSA, and its one recording
    statement goes over an asyncio connection (`_commit_async`): while it waits for the
    server, the loop answers, reads and signs the next batches, with no thread handoff and no
    GIL shared with signing threads (measured with 2 processes, RSA-2048, 8 clients: about
    1.1x OpenBao against 0.95-1.0x with every batch on a thread). A batch that must read goes
    to a thread. Signing on the loop holds it for as long as one batch's RSA signatures take
    (about 250 µs each).
    """

    def __init__(
        self,
        engine: Engine,
        key_store: CachingKeyStore,
        *,
        max_batch: int = MAX_BATCH,
        max_in_flight: int | None = None,
    ) -> None:
        self.engine = engine
        self.key_store = key_store
        self.max_batch = max_batch
        on_sqlite = engine.url.get_backend_name() == "sqlite"
        if max_in_flight is None:
            max_in_flight = 2 if on_sqlite else 3
        self.max_in_flight = max_in_flight
        self.spin_seconds = SPIN_SECONDS
        self._idle: list[SqliteDatabase | PostgresDatabase] = []  # connections not in use
        self._pending: list[tuple[SignCall, OutcomeSink]] = []
        self._in_flight = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_in_flight, thread_name_prefix="sign-batch")
        self._lock = threading.Lock()
        self._closed = False
        self._cache = ReadCache()
        self._on_loop_allowed = on_sqlite
        # PostgreSQL: batches whose reads all come from the cache are signed on the loop and
        # recorded over asyncio connections (`_record_async`); the others go to the threads.
        self._conninfo = None if on_sqlite else _conninfo(engine)
        self._async_idle: list[Any] = []  # psycopg.AsyncConnection, not in use
        self._tasks: set[asyncio.Task[None]] = set()
        self._checkpointer: WalCheckpointer | None = None
        # signer id -> key algorithm, as the last batch that reached the signer saw it.
        self._key_algorithms: dict[str, str] = {}

    async def sign(self, call: SignCall) -> SignResult:
        future: asyncio.Future[Outcome | BaseException] = asyncio.get_running_loop().create_future()

        def settle(outcome: Outcome | BaseException) -> None:
            if not future.done():  # a caller who went away leaves a cancelled future
                future.set_result(outcome)

        self.submit(call, settle)
        outcome = await future
        if isinstance(outcome, BaseException):  # a refusal (SigngateError) or the batch's failure
            raise outcome
        return outcome

    def submit(self, call: SignCall, on_outcome: OutcomeSink) -> None:
        """`sign` without a task: `on_outcome` gets, on the loop, the call's outcome (its
        SignResult or the SigngateError that answers it) or the exception its batch failed
        with, once the batch has committed. Called on the event loop."""
        loop = asyncio.get_running_loop()
        self._pending.append((call, on_outcome))
        if self._in_flight < self.max_in_flight:
            self._in_flight += 1
            # Started once calls stop arriving (`_gather`): those read meanwhile join the batch.
            loop.call_soon(self._gather, loop, len(self._pending), 0)

    def _gather(self, loop: asyncio.AbstractEventLoop, seen: int, turns: int) -> None:
        """Wait another loop turn while calls keep arriving (up to a few turns), then start."""
        if len(self._pending) > seen and turns < 4 and len(self._pending) < self.max_batch:
            loop.call_soon(self._gather, loop, len(self._pending), turns + 1)
        elif turns == 0:
            loop.call_soon(self._start, loop)
        else:
            self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the next batch; the caller has counted it in `_in_flight`."""
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        if not batch:
            self._in_flight -= 1
            return
        calls = [call for call, _ in batch]
        if self._cheap(calls):
            db = self._checkout()
            if isinstance(db, SqliteDatabase):
                # Reads and ECDSA signatures on the loop, without the writers' lock, which is
                # only taken for the write transaction (`_write_when_free`).
                prepared = prepare_batch(db, self.key_store, calls, self._key_algorithms, self._cache)
                self._write_when_free(loop, batch, db, prepared)
                return
            self._checkin(db)
        elif self._conninfo is not None:
            prepared = prepare_batch(NoRoundTrips(), self.key_store, calls, self._key_algorithms, self._cache)
            if prepared.failed is None:
                task = loop.create_task(self._record_async(loop, batch, prepared))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
        self._on_thread(loop, batch)

    def _on_thread(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[SignCall, OutcomeSink]]) -> None:
        """The whole batch, reads to commit, on a thread of the pool (`_run`)."""
        done = self._executor.submit(self._run, [call for call, _ in batch])
        done.add_done_callback(lambda f: loop.call_soon_threadsafe(self._finish, loop, batch, f))

    async def _record_async(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[SignCall, OutcomeSink]],
        prepared: PreparedBatch,
    ) -> None:
        """Phase 2 of a PostgreSQL batch prepared on the loop: the one statement that records
        it, over an asyncio connection, so the loop answers and signs other batches meanwhile."""
        done: concurrent.futures.Future[list[Outcome]] = concurrent.futures.Future()
        try:
            done.set_result(await self._commit_async(prepared))
        except StaleReads:
            self._on_thread(loop, batch)  # read afresh and sign again
            return
        except Exception as exc:  # handed to the callers, as from a thread
            done.set_exception(exc)
        self._finish(loop, batch, done)

    async def _commit_async(self, prepared: PreparedBatch) -> list[Outcome]:
        if not prepared.attempts:
            return cast(list[Outcome], prepared.outcomes)
        document, grouped = _batch_request(prepared.attempts, prepared.now)
        params = {"batch": document, "at": prepared.now, "epoch": prepared.epoch}
        conn: Any = None
        try:
            conn = self._async_idle.pop() if self._async_idle else await _connect_async(self._conninfo)
            cursor = await conn.execute(_pyformat(_RECORD_BATCH), params)
            found = await cursor.fetchone()
        except Exception as exc:
            if conn is not None:
                await _close_async_quietly(conn)
            if not is_connectivity_error(exc):
                # Refused for another reason: the thread path retries it one call at a time.
                return await asyncio.get_running_loop().run_in_executor(
                    self._executor, lambda: self._record(self._checkout(), prepared)
                )
            log.warning("sign batch: the database is unreachable: %s", exc)
            return _unreachable(prepared)
        if self._closed:
            await _close_async_quietly(conn)
        else:
            self._async_idle.append(conn)
        try:
            _settle_recorded(prepared.attempts, grouped, PostgresDatabase.read_json(found[0]))
        except StaleReads:
            self._cache.forget()
            raise
        self._cache.denied(prepared.attempts)
        return _answers(prepared)

    def _write_when_free(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[SignCall, OutcomeSink]],
        db: SqliteDatabase,
        prepared: PreparedBatch,
        since: float | None = None,
    ) -> None:
        """Phase 2 of a prepared batch, on the loop, once the writers' lock is free: if another
        process holds it, the loop tries again on its next turns (since `since`) and then a
        thread waits until it is let go (the loop never blocks on another writer, and the write
        itself never waits on a thread for the GIL while holding the lock that the other
        processes wait for)."""
        if not prepared.attempts or db.try_lock():
            done: concurrent.futures.Future[list[Outcome]] = concurrent.futures.Future()
            try:
                done.set_result(self._record(db, prepared))  # lets go of the lock
            except StaleReads:  # nothing recorded: read and sign again, on a thread
                self._checkin(db)
                self._on_thread(loop, batch)
                return
            except Exception as exc:  # handed to the callers, as from a thread
                done.set_exception(exc)
            self._finish(loop, batch, done)
            return
        # Another process holds the lock, as a rule for one batch of its own (a few hundred µs):
        # try again on the loop's next turns, between its other work, for up to `SPIN_SECONDS`.
        # Handing that short wait to a thread costs more than it: the thread's wake-up, its turn
        # at the GIL and the loop's wake-up (measured with 2 processes, ECDSA, 8 clients: about
        # 7% more signatures a second). A longer hold goes to a thread.
        now = time.monotonic()
        if since is None:
            since = now
        if now - since < self.spin_seconds:
            loop.call_soon(self._write_when_free, loop, batch, db, prepared, since)
            return
        waited = self._executor.submit(db.wait_until_free)
        waited.add_done_callback(
            lambda _: loop.call_soon_threadsafe(self._write_when_free, loop, batch, db, prepared)
        )

    def _record(self, db: SqliteDatabase | PostgresDatabase, prepared: PreparedBatch) -> list[Outcome]:
        """`commit_batch` on a checked-out connection, which it gives back (or drops on failure)."""
        try:
            outcomes = commit_batch(db, prepared)
            if self._checkpointer is not None:
                self._checkpointer.dirty = True
        except StaleReads:
            raise  # nothing was recorded; the connection stays with the caller
        except BaseException:
            _close_quietly(db)
            raise
        finally:
            if isinstance(db, SqliteDatabase):
                db.unlock()
        self._cache.denied(prepared.attempts)
        self._checkin(db)
        return outcomes

    def _cheap(self, calls: list[SignCall]) -> bool:
        """Every call of the batch goes to a signer last seen with an EC key (on SQLite)."""
        if not self._on_loop_allowed:
            return False
        known = self._key_algorithms
        for call in calls:
            algorithm = known.get(call.signer_id)
            if algorithm is None or not algorithm.startswith("EC_"):
                return False
        return True

    def _checkout(self) -> SqliteDatabase | PostgresDatabase:
        with self._lock:
            db = self._idle.pop() if self._idle else None
            if len(self._key_algorithms) > 10_000:
                self._key_algorithms = {}
        if db is not None:
            return db
        db = open_database(self.engine)
        if isinstance(db, SqliteDatabase):
            with self._lock:
                if self._checkpointer is None and not self._closed:
                    path = str(self.engine.url.database)
                    self._checkpointer = WalCheckpointer(path, lock_path=SqliteDatabase.lock_path_of(path))
                if self._checkpointer is not None:
                    db.no_autocheckpoint()
                    db.defer_indexes = True
        return db

    def _checkin(self, db: SqliteDatabase | PostgresDatabase) -> None:
        with self._lock:
            if self._closed:
                _close_quietly(db)
            else:
                self._idle.append(db)

    def _run(self, calls: list[SignCall]) -> list[Outcome]:
        db = self._checkout()
        for _ in range(2):
            prepared = prepare_batch(db, self.key_store, calls, self._key_algorithms, self._cache)
            try:
                return self._record(db, prepared)
            except StaleReads:
                continue  # read and sign again
        # Settings changing under every try: read everything for this batch, as without a cache.
        return self._record(db, prepare_batch(db, self.key_store, calls, self._key_algorithms))

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[SignCall, OutcomeSink]],
        done: concurrent.futures.Future[list[Outcome]],
    ) -> None:
        error = done.exception()
        outcomes = done.result() if error is None else None
        for position, (_, on_outcome) in enumerate(batch):
            try:
                on_outcome(error if outcomes is None else outcomes[position])
            except Exception:  # one caller's answer must not keep the others from theirs
                log.exception("answering a sign call failed")
        if self._pending:
            # The calls that arrived meanwhile form the next batch, on the slot this one frees.
            loop.call_soon(self._start, loop)
        else:
            self._in_flight -= 1

    async def aclose(self) -> None:
        """`close`, after the batches on the loop and their asyncio connections."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._closed = True
        idle, self._async_idle = self._async_idle, []
        for conn in idle:
            await _close_async_quietly(conn)
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            checkpointer, self._checkpointer = self._checkpointer, None
        for db in idle:
            _close_quietly(db)
        if checkpointer is not None:
            checkpointer.close()


def _conninfo(engine: Engine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


async def _connect_async(conninfo: str | None) -> Any:
    import psycopg

    assert conninfo is not None
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)


async def _close_async_quietly(conn: Any) -> None:
    try:
        await conn.close()
    except Exception:  # noqa: S110 - nothing more to do with a connection being dropped
        pass


def _close_quietly(db: SqliteDatabase | PostgresDatabase) -> None:
    try:
        db.close()
    except Exception:  # noqa: S110 - nothing more to do with a connection being dropped
        pass


def sign_once(engine: Engine, key_store: CachingKeyStore, call: SignCall) -> SignResult:
    """One call as a batch of one on a pooled connection (activities, command-line paths)."""
    raw = engine.raw_connection()
    try:
        driver = raw.driver_connection
        db: Database = (
            SqliteDatabase(driver) if isinstance(driver, sqlite3.Connection) else PostgresDatabase(driver)
        )
        outcome = run_batch(db, key_store, [call])[0]
    finally:
        raw.close()
    if isinstance(outcome, SigngateError):
        raise outcome
    return outcome
