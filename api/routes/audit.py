"""The audit trail: query events, and verify the hash chain. Both need the audit:read scope."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy import ColumnElement, func
from sqlmodel import col, select

from api.deps import AuditorPrincipal, PageDep, SessionDep
from api.schemas import ApiModel, Page
from core.errors import BadRequest
from core.timeutil import as_utc, rfc3339
from store import audit, deferred
from store.models import AuditEvent

router = APIRouter(tags=["audit"])

# RFC 3339 date-time. A "+" offset sent unencoded in a query string arrives as a space, so a
# space is taken where the offset's sign belongs.
_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?)(?:([Zz])|([+ -])(\d{2}:\d{2}))?$"
)


class AuditEventPublic(ApiModel):
    id: str
    seq: int
    at: str = Field(description="RFC 3339 UTC, exactly as hashed")
    actor_id: str | None
    actor_name: str | None
    action: str
    entity_type: str
    entity_id: str
    request_id: str | None
    data: dict[str, Any]
    ip_address: str | None
    prev_hash: str
    hash: str


class ChainVerification(ApiModel):
    valid: bool
    count: int
    head_hash: str
    head_seq: int
    first_broken_seq: int | None


def parse_since(value: str) -> datetime:
    match = _RFC3339.match(value.strip())
    if match is None:
        raise BadRequest(
            "since must be an RFC 3339 date-time such as 2026-11-24T10:00:00Z", code="invalid_request"
        )
    day, clock, zulu, sign, offset = match.groups()
    if "." in clock:
        whole, fraction = clock.split(".")
        clock = f"{whole}.{fraction[:6].ljust(6, '0')}"
    suffix = "+00:00" if zulu or not offset else f"{'-' if sign == '-' else '+'}{offset}"
    try:
        return as_utc(datetime.fromisoformat(f"{day}T{clock}{suffix}"))
    except ValueError as exc:
        raise BadRequest(f"since is not a valid date-time: {exc}", code="invalid_request") from exc


def _public(event: AuditEvent) -> AuditEventPublic:
    return AuditEventPublic(
        id=event.id,
        seq=event.seq,
        at=rfc3339(event.at) or "",
        actor_id=event.actor_id,
        actor_name=event.actor_name,
        action=event.action,
        entity_type=event.entity_type,
        entity_id=event.entity_id,
        request_id=event.request_id,
        data=event.data,
        ip_address=event.ip_address,
        prev_hash=event.prev_hash,
        hash=event.hash,
    )


@router.get("/audit-events", response_model=Page[AuditEventPublic])
def list_audit_events(
    session: SessionDep,
    _: AuditorPrincipal,
    page: PageDep,
    entity_type: Annotated[str | None, Query(alias="entityType")] = None,
    entity_id: Annotated[str | None, Query(alias="entityId")] = None,
    actor_id: Annotated[str | None, Query(alias="actorId")] = None,
    action: Annotated[str | None, Query()] = None,
    since: Annotated[str | None, Query()] = None,
    request_id: Annotated[str | None, Query(alias="requestId")] = None,
) -> Page[AuditEventPublic]:
    """Events in chain order. requestId (an extension) is one signing request's whole history."""
    conditions: list[ColumnElement[bool]] = []
    for column, wanted in (
        (AuditEvent.entity_type, entity_type),
        (AuditEvent.entity_id, entity_id),
        (AuditEvent.actor_id, actor_id),
        (AuditEvent.action, action),
        (AuditEvent.request_id, request_id),
    ):
        if wanted is not None:
            conditions.append(col(column) == wanted)
    conditions = deferred.visible(session, conditions)
    if since is not None:
        conditions.append(col(AuditEvent.at) >= parse_since(since))
    total = session.exec(select(func.count()).select_from(AuditEvent).where(*conditions)).one()
    rows = session.exec(
        select(AuditEvent)
        .where(*conditions)
        .order_by(col(AuditEvent.seq))
        .offset(page.offset)
        .limit(page.limit)
    ).all()
    return Page[AuditEventPublic](items=[_public(r) for r in rows], total=total)


@router.get("/audit-events/verify", response_model=ChainVerification)
def verify_audit_chain(session: SessionDep, _: AuditorPrincipal) -> ChainVerification:
    report = audit.verify(session)
    return ChainVerification(
        valid=report.valid,
        count=report.count,
        head_hash=report.head_hash,
        head_seq=report.head_seq,
        first_broken_seq=report.first_broken_seq,
    )
