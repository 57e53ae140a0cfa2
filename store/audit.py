"""The tamper-evident audit trail: one append-only event per change, hash-chained.

An event is written in the same transaction as the change it records. The chain head lives in
one row that every append updates first, so concurrent writers (several API processes and
workers on PostgreSQL) queue on its row lock and sequence numbers have no gaps; a rolled-back
change rolls back its sequence number with it. The head row stays locked until the caller
commits, so record an event after the change it describes: the head is then the last lock a
transaction takes, and two writers can never wait on each other in a cycle.

Each hash is ``sha256(prev_hash + canonical_json(content))`` where content holds every stored
field but the two hashes (see `event_hash`); an exported event therefore carries all an outside
auditor needs to recompute the chain.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Protocol, cast

from pydantic import BaseModel
from sqlalchemy import insert, text, true
from sqlalchemy import select as sa_select
from sqlmodel import Session

from core.timeutil import rfc3339, utcnow
from store.models import AuditEvent, AuditHead

GENESIS_HASH = "0" * 64


@dataclass(frozen=True)
class Actor:
    id: str | None
    name: str | None
    ip_address: str | None = None


SYSTEM = Actor(id=None, name="system")


def event_hash(
    *,
    prev_hash: str,
    seq: int,
    event_id: str,
    at: datetime | str,
    actor_id: str | None,
    actor_name: str | None,
    action: str,
    entity_type: str,
    entity_id: str,
    request_id: str | None,
    data: dict[str, Any],
    ip_address: str | None,
) -> str:
    """`at` is the event's time, or its RFC 3339 text (`rfc3339`) when a caller hashes many."""
    content = {
        "id": event_id,
        "seq": seq,
        "at": at if isinstance(at, str) else rfc3339(at),
        "actorId": actor_id,
        "actorName": actor_name,
        "action": action,
        "entityType": entity_type,
        "entityId": entity_id,
        "requestId": request_id,
        "data": data,
        "ipAddress": ip_address,
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def to_json_value(value: Any) -> Any:
    """The JSON value an event stores for `value`, chosen so it reads back identically.

    Whatever comes back from SQLite's or PostgreSQL's JSON column must hash as it did when it
    was written: so times become RFC 3339 text, bytes base64, tuples lists, and values JSON
    (or PostgreSQL) cannot hold (NaN, unpaired surrogates) become text.
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _valid_text(value)
    if isinstance(value, Mapping):
        return {_valid_text(str(k)): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if isinstance(value, set | frozenset):
        items = [to_json_value(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, enum.Enum):
        return to_json_value(value.value)
    if isinstance(value, BaseModel):
        return to_json_value(value.model_dump(mode="json", by_alias=True))
    return _valid_text(str(value))


def _valid_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    # PostgreSQL text cannot hold NUL, and a JSON column may be read back as text.
    return value.replace("\x00", "\ufffd")


def record(
    session: Session,
    *,
    actor: Actor,
    action: str,
    entity_type: str,
    entity_id: str,
    data: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> AuditEvent:
    """Append one event to the chain inside the caller's transaction."""
    seq, prev_hash = advance_head(session, 1)
    event = AuditEvent(
        **_chained_row(PendingEvent(actor, action, entity_type, entity_id, data, request_id), seq, prev_hash)
    )
    session.add(event)
    session.execute(_SET_HEAD_HASH, {"h": event.hash})
    session.flush()
    return event


@dataclass(frozen=True)
class PendingEvent:
    """One event for `record_many`: what `record` takes, as a value."""

    actor: Actor
    action: str
    entity_type: str
    entity_id: str
    data: dict[str, Any] | None = None
    request_id: str | None = None


_ADVANCE_HEAD = text("UPDATE audit_head SET seq = seq + :count WHERE id = 1 RETURNING seq, hash")
_SET_HEAD_HASH = text("UPDATE audit_head SET hash = :h WHERE id = 1")
# PostgreSQL: chained rows (`pg_events_document`) inserted by a data-modifying CTE, which a
# statement of other writes can carry.
PG_INSERT_EVENTS_CTE = """
events AS (
    INSERT INTO audit_events (id, seq, at, actor_id, actor_name, action, entity_type, entity_id,
        request_id, data, ip_address, prev_hash, hash)
    SELECT e.id, e.seq, e.at, e.actor_id, e.actor_name, e.action, e.entity_type, e.entity_id,
        e.request_id, e.data, e.ip_address, e.prev_hash, e.hash
    FROM json_to_recordset(CAST(:events AS json)) AS e(id text, seq int, at timestamptz,
        actor_id text, actor_name text, action text, entity_type text, entity_id text,
        request_id text, data json, ip_address text, prev_hash text, hash text)
    RETURNING 1
)
"""
# PostgreSQL: the events and the head's new hash in one statement (one round trip).
_INSERT_EVENTS_SET_HEAD_HASH = text(
    "WITH " + PG_INSERT_EVENTS_CTE + "UPDATE audit_head SET hash = :h WHERE id = 1"  # noqa: S608 (constants)
)


def _chained_row(event: PendingEvent, seq: int, prev_hash: str) -> dict[str, Any]:
    """The stored values of `event` as number `seq` of the chain, after the event `prev_hash`:
    its data as JSON stores it, a new id, the time now, and its hash over all of them."""
    payload = cast(dict[str, Any], to_json_value(event.data or {}))
    event_id = str(uuid.uuid4())
    at = utcnow()
    actor = event.actor
    digest = event_hash(
        prev_hash=prev_hash,
        seq=seq,
        event_id=event_id,
        at=at,
        actor_id=actor.id,
        actor_name=actor.name,
        action=event.action,
        entity_type=event.entity_type,
        entity_id=event.entity_id,
        request_id=event.request_id,
        data=payload,
        ip_address=actor.ip_address,
    )
    return {
        "id": event_id,
        "seq": seq,
        "at": at,
        "actor_id": actor.id,
        "actor_name": actor.name,
        "action": event.action,
        "entity_type": event.entity_type,
        "entity_id": event.entity_id,
        "request_id": event.request_id,
        "data": payload,
        "ip_address": actor.ip_address,
        "prev_hash": prev_hash,
        "hash": digest,
    }


def advance_head(session: Session, count: int) -> tuple[int, str]:
    """Take `count` sequence numbers (and the head's row lock, until the commit): the head's
    (seq, hash) after the advance, for `record_many(..., head=...)`."""
    row = session.execute(_ADVANCE_HEAD, {"count": count}).one()
    return int(row[0]), str(row[1])


def record_many(
    session: Session, events: Sequence[PendingEvent], *, head: tuple[int, str] | None = None
) -> None:
    """Append `events` to the chain in their order inside the caller's transaction: the same
    rows, sequence numbers and hashes as calling `record` for each in turn, in three statements
    whatever their number (the head advanced by their count, which takes its row lock; the
    events inserted at once; the head's hash set), two on PostgreSQL. `head` is the head as
    `advance_head(session, len(events))` left it, when the caller advanced it already (in a
    statement of its own). Call it once the transaction's other writes are done, so the head
    is its last lock."""
    if not events:
        return
    last_seq, prev_hash = head if head is not None else advance_head(session, len(events))
    rows = chained_rows(events, (last_seq - len(events), prev_hash))
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            _INSERT_EVENTS_SET_HEAD_HASH, {"events": pg_events_document(rows), "h": rows[-1]["hash"]}
        )
        return
    session.execute(insert(AuditEvent.__table__), rows)  # type: ignore[attr-defined]
    session.execute(_SET_HEAD_HASH, {"h": rows[-1]["hash"]})


def chained_rows(events: Sequence[PendingEvent], head: tuple[int, str]) -> list[dict[str, Any]]:
    """The stored values of `events` appended in their order to a chain whose head is `head`
    (seq, hash) before them: the caller holds the head's row lock, and sets the head to the
    last row's seq and hash in the same transaction."""
    seq, prev_hash = head
    rows: list[dict[str, Any]] = []
    for event in events:
        seq += 1
        rows.append(_chained_row(event, seq, prev_hash))
        prev_hash = rows[-1]["hash"]
    return rows


def pg_events_document(rows: Sequence[dict[str, Any]]) -> str:
    """`chained_rows` as the :events parameter of PG_INSERT_EVENTS_CTE."""
    return json.dumps([{**row, "at": rfc3339(row["at"])} for row in rows])


class ChainedEvent(Protocol):
    """What verification reads of a stored event: an AuditEvent or a row of its table."""

    @property
    def id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def at(self) -> datetime: ...
    @property
    def actor_id(self) -> str | None: ...
    @property
    def actor_name(self) -> str | None: ...
    @property
    def action(self) -> str: ...
    @property
    def entity_type(self) -> str: ...
    @property
    def entity_id(self) -> str: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def data(self) -> dict[str, Any]: ...
    @property
    def ip_address(self) -> str | None: ...
    @property
    def prev_hash(self) -> str: ...
    @property
    def hash(self) -> str: ...


@dataclass(frozen=True)
class ChainReport:
    valid: bool
    count: int
    head_hash: str
    first_broken_seq: int | None
    head_seq: int = 0


def verify_chain(events: Iterable[ChainedEvent], head_seq: int, head_hash: str) -> ChainReport:
    """Recompute every hash in sequence order; name the first sequence number that fails.

    `events` must come in ascending seq order. A deleted row shows as a gap (the missing seq is
    named), an altered row as a hash mismatch, two rows whose seqs were swapped as a mismatch at
    the lower one (seq and prev_hash are hashed), a truncated tail as a head that points past
    the last event (the first missing seq is named), and rows appended behind the head's back
    as events past it. `count` is the number of events stored, broken or not.
    """
    prev = GENESIS_HASH
    expected_seq = 1
    count = 0
    first_broken: int | None = None
    for ev in events:
        count += 1
        if first_broken is not None:
            continue
        if ev.seq != expected_seq:
            first_broken = expected_seq
            continue
        recomputed = event_hash(
            prev_hash=prev,
            seq=ev.seq,
            event_id=ev.id,
            at=ev.at,
            actor_id=ev.actor_id,
            actor_name=ev.actor_name,
            action=ev.action,
            entity_type=ev.entity_type,
            entity_id=ev.entity_id,
            request_id=ev.request_id,
            data=ev.data,
            ip_address=ev.ip_address,
        )
        if ev.prev_hash != prev or ev.hash != recomputed:
            first_broken = ev.seq
            continue
        prev = ev.hash
        expected_seq += 1
    if first_broken is None:
        last_seq = expected_seq - 1
        if last_seq < head_seq:
            first_broken = last_seq + 1
        elif last_seq > head_seq:
            first_broken = head_seq + 1
        elif prev != head_hash:
            first_broken = max(head_seq, 1)
    return ChainReport(first_broken is None, count, head_hash, first_broken, head_seq)


def verify(session: Session) -> ChainReport:
    """Verify the chain as one snapshot: head and events are read by a single statement.

    Under PostgreSQL's READ COMMITTED two statements may see different commits, and a writer
    committing between them would look like a truncated or overrun chain.
    """
    head_table = AuditHead.__table__  # type: ignore[attr-defined]
    events_table = AuditEvent.__table__  # type: ignore[attr-defined]
    statement = (
        sa_select(
            head_table.c.seq.label("head_seq"),
            head_table.c.hash.label("head_hash"),
            *events_table.c,
        )
        .select_from(head_table.outerjoin(events_table, true()))
        .where(head_table.c.id == 1)
        .order_by(events_table.c.seq)
        .execution_options(yield_per=1000)
    )
    rows = iter(session.execute(statement))
    first = next(rows, None)
    if first is None:
        raise RuntimeError("the audit_head row is missing: the database is not migrated")
    head_seq, head_hash = int(first.head_seq), str(first.head_hash)

    def stored_events() -> Iterable[ChainedEvent]:
        if first.seq is not None:
            yield cast(ChainedEvent, first)
        for row in rows:
            yield cast(ChainedEvent, row)

    return verify_chain(stored_events(), head_seq, head_hash)
