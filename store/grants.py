"""Grants as users see them: the stored status, with time-based expiry applied at read time."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from core.errors import Conflict, NotFound
from core.timeutil import utcnow
from store import audit
from store.models import Grant


def effective_status(grant: Grant, now: datetime | None = None) -> str:
    """Expiry is exact at the moment of the call, never left to a sweep."""
    if grant.status == "active" and grant.valid_until <= (now or utcnow()):
        return "expired"
    return grant.status


def get_grant(session: Session, grant_id: str) -> Grant:
    grant = session.get(Grant, grant_id)
    if grant is None:
        raise NotFound("no such grant")
    return grant


def revoke_grant(*, session: Session, grant_id: str, reason: str, actor: audit.Actor) -> Grant:
    grant = session.get(Grant, grant_id, with_for_update=True)
    if grant is None:
        raise NotFound("no such grant")
    if grant.status != "active":
        raise Conflict(f"the grant is already {grant.status}", code="grant_not_active")
    grant.status = "revoked"
    grant.revoked_at = utcnow()
    grant.revoke_reason = reason
    session.add(grant)
    audit.record(
        session,
        actor=actor,
        action="grant.revoked",
        entity_type="grant",
        entity_id=grant.id,
        request_id=grant.request_id,
        data={"reason": reason, "usedSignOperations": grant.used_sign_operations},
    )
    return grant
