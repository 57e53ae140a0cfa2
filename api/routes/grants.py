"""Grants: the right to sign that an approved request gives its requester."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy import and_, func, or_, select

from api.deps import ActorDep, CurrentPrincipal, PageDep, SessionDep
from api.schemas import ApiModel, Page
from core.errors import BadRequest, Forbidden
from core.timeutil import utcnow
from store.grants import effective_status, get_grant, revoke_grant
from store.identities import Principal
from store.models import Grant

router = APIRouter(tags=["grants"])


class GrantPublic(ApiModel):
    id: str
    request_id: str
    signer_id: str
    identity_id: str
    valid_from: datetime
    valid_until: datetime
    allowed_sign_operations: int
    used_sign_operations: int
    status: str
    revoked_at: datetime | None
    revoke_reason: str | None
    created_at: datetime


class RevokeBody(ApiModel):
    reason: str = Field(min_length=1, max_length=2000)


def public(grant: Grant) -> GrantPublic:
    data = GrantPublic.model_validate(grant, from_attributes=True)
    data.status = effective_status(grant)
    return data


def _sees_all(principal: Principal) -> bool:
    return principal.is_admin or principal.has("audit:read") or principal.has("codesign:approve")


@router.get("/pki/grants", response_model=Page[GrantPublic])
def list_grants(
    session: SessionDep,
    principal: CurrentPrincipal,
    page: PageDep,
    signer_id: Annotated[str | None, Query(alias="signerId")] = None,
    identity_id: Annotated[str | None, Query(alias="identityId")] = None,
    status: Literal["active", "exhausted", "expired", "revoked"] | None = None,
) -> Page[GrantPublic]:
    conditions = []
    if signer_id:
        conditions.append(Grant.signer_id == signer_id)
    if identity_id:
        conditions.append(Grant.identity_id == identity_id)
    if not _sees_all(principal):
        conditions.append(Grant.identity_id == principal.identity_id)
    now = utcnow()
    if status == "expired":
        conditions.append(
            or_(Grant.status == "expired", and_(Grant.status == "active", Grant.valid_until <= now))
        )
    elif status == "active":
        conditions.append(and_(Grant.status == "active", Grant.valid_until > now))
    elif status:
        conditions.append(Grant.status == status)
    total = session.execute(select(func.count()).select_from(Grant).where(*conditions)).scalar_one()
    rows = session.exec(
        select(Grant)
        .where(*conditions)
        .order_by(Grant.created_at.desc(), Grant.id)
        .offset(page.offset)
        .limit(page.limit)
    ).all()
    return Page[GrantPublic](items=[public(r[0]) for r in rows], total=total)


@router.get("/pki/grants/{grant_id}", response_model=GrantPublic)
def read_grant(grant_id: str, session: SessionDep, principal: CurrentPrincipal) -> GrantPublic:
    grant = get_grant(session, grant_id)
    if grant.identity_id != principal.identity_id and not _sees_all(principal):
        raise Forbidden("you may not see this grant")
    return public(grant)


@router.post("/pki/grants/{grant_id}/revoke", response_model=GrantPublic)
def revoke(
    grant_id: str, body: RevokeBody, session: SessionDep, principal: CurrentPrincipal, actor: ActorDep
) -> GrantPublic:
    """Admins and approvers revoke any grant; a holder may give up their own."""
    grant = get_grant(session, grant_id)
    if not (
        principal.is_admin or principal.has("codesign:approve") or grant.identity_id == principal.identity_id
    ):
        raise Forbidden("you may not revoke this grant")
    if not body.reason.strip():
        raise BadRequest("a reason is required", code="invalid_request")
    return public(revoke_grant(session=session, grant_id=grant_id, reason=body.reason, actor=actor))
