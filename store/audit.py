"""The tamper-evident audit trail: one append-only event per change, hash-chained.

An event is written in the same transaction as the change it records. The chain head lives in
one row that every append updates first, so concurrent writers (several API processes and
workers on PostgreSQL) queue on its row lock and sequence numbers have no gaps; a rolled-back
change rolls back its sequence number with it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlmodel import Session, select

from core.timeutil import rfc3339, utcnow
from store.models import AuditEvent

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
    at: datetime,
    actor_id: str | None,
    actor_name: str | None,
    action: str,
    entity_type: str,
    entity_id: str,
    request_id: str | None,
    data: dict[str, Any],
    ip_address: str | None,
) -> str:
    content = {
        "id": event_id,
        "seq": seq,
        "at": rfc3339(at),
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
    row = session.execute(
        text("UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
    ).one()
    seq, prev_hash = int(row[0]), str(row[1])
    payload = json.loads(json.dumps(data or {}, default=str))
    event_id = str(uuid.uuid4())
    at = utcnow()
    digest = event_hash(
        prev_hash=prev_hash,
        seq=seq,
        event_id=event_id,
        at=at,
        actor_id=actor.id,
        actor_name=actor.name,
        action=action,
        entity_type=entity_type,
        entity_id=entity_id,
        request_id=request_id,
        data=payload,
        ip_address=actor.ip_address,
    )
    event = AuditEvent(
        id=event_id,
        seq=seq,
        at=at,
        actor_id=actor.id,
        actor_name=actor.name,
        action=action,
        entity_type=entity_type,
        entity_id=entity_id,
        request_id=request_id,
        data=payload,
        ip_address=actor.ip_address,
        prev_hash=prev_hash,
        hash=digest,
    )
    session.add(event)
    session.execute(text("UPDATE audit_head SET hash = :h WHERE id = 1"), {"h": digest})
    session.flush()
    return event


@dataclass(frozen=True)
class ChainReport:
    valid: bool
    count: int
    head_hash: str
    first_broken_seq: int | None


def verify_chain(events: Iterable[AuditEvent], head_seq: int, head_hash: str) -> ChainReport:
    """Recompute every hash in sequence order; name the first sequence number that fails.

    A deleted row shows as a gap, a reordered or altered row as a hash mismatch, and a
    truncated tail as a head that no longer matches the last event.
    """
    prev = GENESIS_HASH
    expected_seq = 1
    count = 0
    for ev in events:
        count += 1
        if ev.seq != expected_seq:
            return ChainReport(False, count, head_hash, expected_seq)
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
            return ChainReport(False, count, head_hash, ev.seq)
        prev = ev.hash
        expected_seq += 1
    if expected_seq - 1 != head_seq or prev != head_hash:
        return ChainReport(False, count, head_hash, expected_seq if expected_seq <= head_seq else head_seq)
    return ChainReport(True, count, head_hash, None)


def verify(session: Session) -> ChainReport:
    head = session.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).one()
    events = session.exec(select(AuditEvent).order_by(AuditEvent.seq)).yield_per(1000)  # type: ignore[arg-type]
    return verify_chain(events, int(head[0]), str(head[1]))
