"""The sign path on a plain DB-API connection, one transaction for a whole batch of calls.

Every sign call, from the API or from an activity, goes through `run_batch`: the rules live
here and in `store.signing` (input decoding, the signer's state), nowhere else.

A batch runs in two phases on one connection:

1. Reads, no write lock: each call's token is looked up (so a revoked or expired token fails on
   the very next call, from any process), then its scope, the signer with its certificate and
   the caller's membership, the input, the signer's state and, under a policy, whether a grant
   could serve it. Calls that pass are signed now, outside the write lock, so the processes of
   one API never queue behind each other's RSA signatures.
2. One write transaction (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped advisory
   lock so batches of several processes queue in order): each signed call consumes one grant
   operation with a conditional UPDATE (so no grant is ever overspent, whatever runs
   concurrently) and a call that finds nothing left is denied and its signature discarded;
   every recorded attempt gets its signing-operation row, then the audit chain is advanced once
   for the batch, one event per attempt in order. Only after COMMIT does any caller get an
   answer.

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
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import uuid
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
from core.metrics import SIGN_OPERATIONS
from core.timeutil import as_utc, utcnow
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
# Any constant distinguishes the advisory lock of sign batches from others the database may hold.
_PG_BATCH_LOCK = 0x5167_6E67

_UNAUTHORIZED = "a valid bearer token is required"


# ------------------------------------------------------------------------------------- SQL

_CALLER = """
SELECT t.token_hash, t.scopes, t.expires_at, t.revoked_at, i.id, i.name
FROM api_tokens t JOIN identities i ON i.id = t.identity_id
WHERE t.token_hash = :token_hash
"""
_USABLE_GRANT = """
signer_id = :signer_id AND identity_id = :identity_id AND status = 'active'
AND valid_from <= :now AND valid_until > :now AND used_sign_operations < allowed_sign_operations
"""
_GRANT_CANDIDATE = f"SELECT id FROM grants WHERE {_USABLE_GRANT} ORDER BY valid_until, id LIMIT 1"  # noqa: S608
# The signer, its certificate, the caller's membership and whether a grant could serve the call,
# in one round trip.
_SIGNER = f"""
SELECT s.id, s.name, s.status, s.signing_policy_id, c.id, c.status, c.key_algorithm,
       c.sealed_key, c.not_before, c.not_after,
       (SELECT 1 FROM signer_members m WHERE m.signer_id = s.id AND m.identity_id = :identity_id),
       ({_GRANT_CANDIDATE})
FROM signers s JOIN certificates c ON c.id = s.certificate_id
WHERE s.id = :signer_id
"""  # noqa: S608
_CONSUME_SET = """
UPDATE grants SET used_sign_operations = used_sign_operations + 1,
    status = CASE WHEN used_sign_operations + 1 >= allowed_sign_operations THEN 'exhausted' ELSE status END
"""
# The condition is repeated on the row being updated, so a candidate another transaction has
# just exhausted no longer matches (PostgreSQL re-checks it on the newest row version).
_CONSUME = f"{_CONSUME_SET} WHERE id = :grant_id AND {_USABLE_GRANT} RETURNING id, request_id"
_CONSUME_FIRST = f"""
{_CONSUME_SET} WHERE id = ({_GRANT_CANDIDATE}) AND {_USABLE_GRANT} RETURNING id, request_id
"""
_INSERT_OPERATION = """
INSERT INTO signing_operations (id, at, signer_id, actor_id, status, signing_algorithm, data_sha256,
    grant_id, request_id, client_metadata, ip_address, error)
VALUES (:id, :at, :signer_id, :actor_id, :status, :signing_algorithm, :data_sha256,
    :grant_id, :request_id, :client_metadata, :ip_address, :error)
"""
_ADVANCE_HEAD = "UPDATE audit_head SET seq = seq + :count WHERE id = 1 RETURNING seq, hash"
_INSERT_EVENT = """
INSERT INTO audit_events (id, seq, at, actor_id, actor_name, action, entity_type, entity_id,
    request_id, data, ip_address, prev_hash, hash)
VALUES (:id, :seq, :at, :actor_id, :actor_name, :action, 'signing_operation', :entity_id,
    :request_id, :data, :ip_address, :prev_hash, :hash)
"""
_SET_HEAD_HASH = "UPDATE audit_head SET hash = :hash WHERE id = 1"
_STORE_SIGNATURE = "UPDATE signing_requests SET signature = :signature WHERE id = :request_id"

_NAMED = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")


def _pyformat(sql: str) -> str:
    return _NAMED.sub(r"%(\1)s", sql)


# ---------------------------------------------------------------------------- connections


class Database(Protocol):
    """The few things a batch needs from a connection, whichever the database."""

    def rows(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]: ...
    def execute(self, sql: str, params: dict[str, Any]) -> None: ...
    def execute_many(self, sql: str, params: Sequence[dict[str, Any]]) -> None: ...
    def begin_write(self) -> None: ...
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
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600) if lock_path else None
        self._locked = False

    @classmethod
    def open(cls, path: str) -> SqliteDatabase:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "foreign_keys=ON"):
            conn.execute(f"PRAGMA {pragma}")
        return cls(conn, lock_path=path + ".sign-lock")

    def rows(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: dict[str, Any]) -> None:
        self.conn.execute(sql, params)

    def execute_many(self, sql: str, params: Sequence[dict[str, Any]]) -> None:
        self.conn.executemany(sql, params)

    def begin_write(self) -> None:
        if self._lock_fd is not None:
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
        if value is None:
            return None
        return as_utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")

    def read_time(self, value: Any) -> datetime | None:
        if value is None:
            return None
        return as_utc(datetime.fromisoformat(value))

    def read_json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value


class PostgresDatabase:
    """psycopg, one transaction from the first read to COMMIT (reads take no locks)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @classmethod
    def open(cls, conninfo: str) -> PostgresDatabase:
        import psycopg

        return cls(psycopg.connect(conninfo, autocommit=False))

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

    def rows_many(self, sql: str, params: Sequence[dict[str, Any]]) -> list[list[tuple[Any, ...]]]:
        """One query per parameter set, sent together in pipeline mode: one round trip."""
        query = _pyformat(sql)
        cursors = []
        with self.conn.pipeline():
            for one in params:
                cur = self.conn.cursor()
                cur.execute(query, one)
                cursors.append(cur)
        try:
            return [cast(list[tuple[Any, ...]], cur.fetchall()) for cur in cursors]
        finally:
            for cur in cursors:
                cur.close()

    def begin_write(self) -> None:
        self.execute("SELECT pg_advisory_xact_lock(:key)", {"key": _PG_BATCH_LOCK})

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

    def read_json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value


class _Prefetched:
    """A connection whose answers to some reads were fetched ahead, in pipelines (PostgreSQL).

    Phase 1 still asks its questions one call at a time; those already answered cost nothing.
    """

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db
        self.answers: dict[tuple[str, tuple[Any, ...]], list[tuple[Any, ...]]] = {}

    @staticmethod
    def _key(sql: str, params: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
        return sql, tuple(sorted(params.items()))

    def fetch(self, sql: str, params: list[dict[str, Any]]) -> None:
        unique = list({self._key(sql, p): p for p in params}.values())
        if not unique:
            return
        for one, rows in zip(unique, self.db.rows_many(sql, unique), strict=True):
            self.answers[self._key(sql, one)] = rows

    def rows(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        found = self.answers.get(self._key(sql, params))
        return found if found is not None else self.db.rows(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def _prefetch(db: PostgresDatabase, calls: Sequence[SignCall], now: datetime) -> _Prefetched:
    """Phase 1's token and signer reads for every call of the batch, in two round trips."""
    ahead = _Prefetched(db)
    hashes = {call.token: hash_token(call.token) for call in calls if call.token and token_shaped(call.token)}
    ahead.fetch(_CALLER, [{"token_hash": digest} for digest in hashes.values()])
    identities: dict[str, str] = {}
    for token, digest in hashes.items():
        found = ahead.answers.get(ahead._key(_CALLER, {"token_hash": digest}))
        if found:
            identities[token] = found[0][4]
    wanted = []
    for call in calls:
        identity = call.actor.id if call.actor is not None else identities.get(call.token or "")
        if identity is not None or call.actor is not None:
            wanted.append({"signer_id": call.signer_id, "identity_id": identity or "", "now": db.time(now)})
    ahead.fetch(_SIGNER, wanted)
    return ahead


def open_database(engine: Engine) -> SqliteDatabase | PostgresDatabase:
    """A connection of this module's own to the engine's database (one per process or thread)."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ValueError("the sign path needs a SQLite database file")
        return SqliteDatabase.open(url.database)
    return PostgresDatabase.open(url.set(drivername="postgresql").render_as_string(hide_password=False))


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
    operation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    signature: bytes | None = None
    refusal: SigngateError | None = None
    status: str = "denied"
    grant_id: str | None = None
    request_id: str | None = None


Outcome = SignResult | SigngateError


def authenticate(db: Database, token: str | None, now: datetime) -> tuple[audit.Actor, frozenset[str]]:
    """The caller of a token, looked up on this call; Unauthorized for unknown, expired, revoked."""
    if not token_shaped(token):
        raise Unauthorized(_UNAUTHORIZED)
    assert token is not None
    digest = hash_token(token)
    found = db.rows(_CALLER, {"token_hash": digest})
    if not found:
        raise Unauthorized(_UNAUTHORIZED)
    stored_hash, scopes, expires_at, revoked_at, identity_id, name = found[0]
    if not token_usable(stored_hash, digest, revoked_at, db.read_time(expires_at), now):
        raise Unauthorized(_UNAUTHORIZED)
    return audit.Actor(id=identity_id, name=name), frozenset(db.read_json(scopes))


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
    key = SignerKey(
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
    )
    return key, row[10] is not None, row[11] is not None


def _prepare(
    db: Database,
    key_store: CachingKeyStore,
    call: SignCall,
    index: int,
    now: datetime,
    key_algorithms: dict[str, str] | None = None,
) -> _Attempt:
    """Phase 1 for one call: raise what is answered without a record, else the attempt to record."""
    from pki.errors import KeyDecryptionError, PkiError, SigningError
    from pki.signing import sign as pki_sign

    if call.actor is not None:
        actor = call.actor
        key, _, grant_in_sight = _load(db, call, actor.id, now)
    else:
        principal, scopes = authenticate(db, call.token, now)
        if SIGN_SCOPE not in scopes:
            raise Forbidden(f"this call needs the {SIGN_SCOPE} scope")
        key, member, grant_in_sight = _load(db, call, principal.id, now)
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


def _grant_params(db: Database, attempt: _Attempt, now: datetime) -> dict[str, Any]:
    return {"signer_id": attempt.key.signer_id, "identity_id": attempt.actor.id or "", "now": db.time(now)}


def _consume(db: Database, attempt: _Attempt, now: datetime) -> tuple[str, str] | None:
    """Take one operation from an active grant inside its window; (grant id, request id) or None.

    The conditional UPDATE is what decides, in one statement: a candidate another transaction
    has just exhausted no longer matches, and the next candidate is tried.
    """
    params = _grant_params(db, attempt, now)
    if attempt.call.grant_id is not None:
        taken = db.rows(_CONSUME, {**params, "grant_id": attempt.call.grant_id})
        return (str(taken[0][0]), str(taken[0][1])) if taken else None
    for _ in range(5):
        taken = db.rows(_CONSUME_FIRST, params)
        if taken:
            return str(taken[0][0]), str(taken[0][1])
        if not db.rows(_GRANT_CANDIDATE, params):
            return None
    return None


def _write(db: Database, attempts: Sequence[_Attempt], now: datetime) -> None:
    """Phase 2, inside the caller's write transaction."""
    for attempt in attempts:
        if attempt.refusal is not None:
            # A denial names the grant it was pinned to; a failed signature consumed nothing.
            attempt.grant_id = attempt.call.grant_id if attempt.status == "denied" else None
            attempt.request_id = None
            continue
        consumed = _consume(db, attempt, now) if attempt.needs_grant else None
        if attempt.needs_grant and consumed is None:
            attempt.signature = None
            attempt.refusal = _approval_required()
            attempt.status, attempt.grant_id, attempt.request_id = "denied", attempt.call.grant_id, None
            continue
        attempt.status = "success"
        attempt.grant_id, attempt.request_id = consumed if consumed is not None else (None, None)
    db.execute_many(
        _INSERT_OPERATION,
        [
            {
                "id": a.operation_id,
                "at": db.time(now),
                "signer_id": a.key.signer_id,
                "actor_id": a.actor.id or "system",
                "status": a.status,
                "signing_algorithm": a.call.signing_algorithm,
                "data_sha256": a.data_sha256,
                "grant_id": a.grant_id,
                "request_id": a.request_id,
                "client_metadata": None
                if a.call.client_metadata is None
                else json.dumps(a.call.client_metadata),
                "ip_address": a.actor.ip_address,
                "error": None if a.refusal is None else a.refusal.description,
            }
            for a in attempts
        ],
    )
    _append_events(db, attempts)
    for attempt in attempts:
        if attempt.status == "success" and attempt.call.store_signature_on_request is not None:
            assert attempt.signature is not None
            db.execute(
                _STORE_SIGNATURE,
                {
                    "signature": base64.b64encode(attempt.signature).decode(),
                    "request_id": attempt.call.store_signature_on_request,
                },
            )


def _append_events(db: Database, attempts: Sequence[_Attempt]) -> None:
    """One audit event per attempt, chained in order; the head row is the last lock taken."""
    head = db.rows(_ADVANCE_HEAD, {"count": len(attempts)})[0]
    seq, prev_hash = int(head[0]) - len(attempts), str(head[1])
    at = utcnow()
    events = []
    for attempt in attempts:
        seq += 1
        key = attempt.key
        payload = cast(
            dict[str, Any],
            audit.to_json_value(
                {
                    "signerId": key.signer_id,
                    "signerName": key.signer_name,
                    "grantId": attempt.grant_id,
                    "signingAlgorithm": attempt.call.signing_algorithm,
                    "dataSha256": attempt.data_sha256,
                    "error": None if attempt.refusal is None else attempt.refusal.description,
                }
            ),
        )
        event_id = str(uuid.uuid4())
        action = f"signing_operation.{attempt.status}"
        digest = audit.event_hash(
            prev_hash=prev_hash,
            seq=seq,
            event_id=event_id,
            at=at,
            actor_id=attempt.actor.id,
            actor_name=attempt.actor.name,
            action=action,
            entity_type="signing_operation",
            entity_id=attempt.operation_id,
            request_id=attempt.request_id,
            data=payload,
            ip_address=attempt.actor.ip_address,
        )
        events.append(
            {
                "id": event_id,
                "seq": seq,
                "at": db.time(at),
                "actor_id": attempt.actor.id,
                "actor_name": attempt.actor.name,
                "action": action,
                "entity_id": attempt.operation_id,
                "request_id": attempt.request_id,
                "data": json.dumps(payload),
                "ip_address": attempt.actor.ip_address,
                "prev_hash": prev_hash,
                "hash": digest,
            }
        )
        prev_hash = digest
    db.execute_many(_INSERT_EVENT, events)
    db.execute(_SET_HEAD_HASH, {"hash": prev_hash})


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


def _commit(db: Database, attempts: Sequence[_Attempt], now: datetime) -> None:
    db.begin_write()
    try:
        _write(db, attempts, now)
        db.commit()
    except BaseException:
        db.rollback()
        raise


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
    now = utcnow()
    outcomes: list[Outcome | None] = [None] * len(calls)
    attempts: list[_Attempt] = []
    try:
        reads: Database = (
            _prefetch(db, calls, now) if isinstance(db, PostgresDatabase) and len(calls) > 1 else db
        )
        for index, call in enumerate(calls):
            try:
                attempts.append(_prepare(reads, key_store, call, index, now, key_algorithms))
            except SigngateError as exc:
                outcomes[index] = exc
        # PostgreSQL reads opened a transaction; SQLite reads ran in autocommit.
        if not attempts:
            db.rollback()
            return cast(list[Outcome], outcomes)
        try:
            _commit(db, attempts, now)
        except Exception as exc:
            if is_connectivity_error(exc) or len(attempts) == 1:
                raise
            log.warning("a sign batch of %d failed (%s); retrying one call at a time", len(attempts), exc)
            for attempt in attempts:
                try:
                    _commit(db, [attempt], now)
                except Exception as single:
                    if is_connectivity_error(single):
                        raise
                    log.exception("recording a sign attempt failed")
                    attempt.signature = None
                    attempt.refusal = SigningFailed("the signature could not be recorded")
                    attempt.status = "error"
    except Exception as exc:
        try:
            db.rollback()
        except Exception:  # noqa: S110 - the connection is being reported as lost anyway
            pass
        if not is_connectivity_error(exc):
            raise
        log.warning("sign batch: the database is unreachable: %s", exc)
        unavailable = Unavailable("the database is unreachable")
        return [outcome if outcome is not None else unavailable for outcome in outcomes]
    for attempt in attempts:
        if attempt.status != "error":
            SIGN_OPERATIONS.labels(status=attempt.status).inc()
        outcomes[attempt.index] = _outcome(attempt)
    return cast(list[Outcome], outcomes)


# -------------------------------------------------------------------------- group commit


class SignBatcher:
    """Group commit for one API process: the calls that arrive while a batch is being decided
    and committed share the next one.

    Batches run on one thread of their own with one connection, so the event loop keeps
    reading and answering requests while a batch waits for the database or signs. On SQLite a
    batch whose calls all go to signers last seen with an EC key runs on the event loop
    instead: an ECDSA signature and a local commit cost less than the hop to the thread and
    back. RSA signatures (about 250 µs each) and PostgreSQL round trips stay on the thread.
    """

    def __init__(self, engine: Engine, key_store: CachingKeyStore, *, max_batch: int = MAX_BATCH) -> None:
        self.engine = engine
        self.key_store = key_store
        self.max_batch = max_batch
        self._db: SqliteDatabase | PostgresDatabase | None = None
        self._pending: list[tuple[SignCall, asyncio.Future[Outcome]]] = []
        self._running = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sign-batch")
        self._lock = threading.Lock()
        self._on_loop_allowed = engine.url.get_backend_name() == "sqlite"
        # signer id -> key algorithm, as the last batch that reached the signer saw it.
        self._key_algorithms: dict[str, str] = {}

    async def sign(self, call: SignCall) -> SignResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._pending.append((call, future))
        if not self._running:
            self._running = True
            # Scheduled, not started: the other calls of this loop turn join the batch.
            loop.call_soon(self._start, loop)
        outcome = await future
        if isinstance(outcome, SigngateError):
            raise outcome
        return outcome

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        calls = [call for call, _ in batch]
        if self._cheap(calls):
            done: concurrent.futures.Future[list[Outcome]] = concurrent.futures.Future()
            try:
                done.set_result(self._run(calls))
            except Exception as exc:  # handed to the callers, as from the thread
                done.set_exception(exc)
            self._finish(loop, batch, done)
            return
        done = self._executor.submit(self._run, calls)
        done.add_done_callback(lambda f: loop.call_soon_threadsafe(self._finish, loop, batch, f))

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

    def _run(self, calls: list[SignCall]) -> list[Outcome]:
        with self._lock:
            if self._db is None:
                self._db = open_database(self.engine)
            if len(self._key_algorithms) > 10_000:
                self._key_algorithms = {}
            return run_batch(self._db, self.key_store, calls, self._key_algorithms)

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[SignCall, asyncio.Future[Outcome]]],
        done: concurrent.futures.Future[list[Outcome]],
    ) -> None:
        error = done.exception()
        if error is not None:
            self._discard()
        for position, (_, future) in enumerate(batch):
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(done.result()[position])
        if self._pending:
            # The calls that arrive before the loop comes back to it join the next batch.
            loop.call_soon(self._start, loop)
        else:
            self._running = False

    def _discard(self) -> None:
        """After an unexpected failure the connection's state is unknown: open a new one."""
        with self._lock:
            if self._db is not None:
                try:
                    self._db.close()
                except Exception:  # noqa: S110
                    pass
                self._db = None

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._discard()


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
