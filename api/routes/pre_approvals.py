"""Pre-approvals: an approver clears a user in advance for one signer (after Venafi's AddPreApproval)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import uuid
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import Field, field_validator
from sqlalchemy import func, select

from api.deps import ActorDep, ApproverPrincipal, ContextDep, CurrentPrincipal, PageDep, SessionDep
from api.schemas import ApiModel, Page
from api.temporal_calls import signal_pre_approval
from core.errors import BadRequest, Conflict, Forbidden, NotFound
from core.timeutil import as_utc, utcnow
from store import audit
from store.db import session_scope
from store.identities import Principal
from store.models import Identity, PreApproval, Signer, SigningPolicy, SigningRequest

log = logging.getLogger(__name__)
router = APIRouter(tags=["pre-approvals"])


class PreApprovalCreate(ApiModel):
    signer_id: str = Field(min_length=1, max_length=64)
    identity_id: str = Field(min_length=1, max_length=64)
    comment: str = Field(min_length=1, max_length=4000)
    hours: float = Field(default=24, gt=0, le=24 * 366)
    not_before: datetime | None = None
    single_use: bool = False
    ip_address: str | None = Field(default=None, max_length=64)
    signing_executable: str | None = Field(default=None, min_length=1, max_length=1024)

    @field_validator("ip_address")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        if v is None:
            return v
        address = ipaddress.ip_address(v)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(address)


class PreApprovalPublic(ApiModel):
    id: str
    signer_id: str
    identity_id: str
    created_by: str
    comment: str
    not_before: datetime
    expires_at: datetime
    single_use: bool
    ip_address: str | None
    signing_executable: str | None
    status: str
    used_count: int
    last_used_request_id: str | None
    created_at: datetime


def public(row: PreApproval) -> PreApprovalPublic:
    data = PreApprovalPublic.model_validate(row, from_attributes=True)
    if row.status == "active" and row.expires_at <= utcnow():
        data.status = "expired"
    return data


def _approver_of_signer(session: object, signer: Signer, identity_id: str) -> bool:
    if not signer.signing_policy_id:
        return False
    policy = session.get(SigningPolicy, signer.signing_policy_id)  # type: ignore[attr-defined]
    return policy is not None and any(identity_id in s["approverIds"] for s in policy.steps)


@router.post("/pki/pre-approvals", status_code=201, response_model=PreApprovalPublic)
async def create_pre_approval(
    body: PreApprovalCreate, ctx: ContextDep, principal: ApproverPrincipal, actor: ActorDep
) -> PreApprovalPublic:
    if body.identity_id == principal.identity_id:
        raise Forbidden("nobody may pre-approve themself")

    def create() -> PreApproval:
        with session_scope(ctx.engine) as session:
            signer = session.get(Signer, body.signer_id)
            if signer is None:
                raise NotFound("no such signer")
            if session.get(Identity, body.identity_id) is None:
                raise BadRequest("no such identity", code="unknown_identity")
            if not _approver_of_signer(session, signer, principal.identity_id):
                raise Forbidden("you are not among the approvers of this signer's policy")
            now = utcnow()
            not_before = as_utc(body.not_before) if body.not_before else now
            row = PreApproval(
                id=str(uuid.uuid4()),
                signer_id=body.signer_id,
                identity_id=body.identity_id,
                created_by=principal.identity_id,
                comment=body.comment,
                not_before=not_before,
                expires_at=not_before + timedelta(hours=body.hours),
                single_use=body.single_use,
                ip_address=body.ip_address,
                signing_executable=body.signing_executable,
            )
            session.add(row)
            session.flush()
            audit.record(
                session,
                actor=actor,
                action="pre_approval.created",
                entity_type="pre_approval",
                entity_id=row.id,
                data=body.model_dump(mode="json", by_alias=True),
            )
            return row

    def waiting_workflows() -> list[str]:
        """Open requests it may release, read only once the pre-approval is committed.

        A request's workflow records the request before it first tries to claim, so one whose
        claim missed this pre-approval (it ran before the commit) is already listed here.
        """
        with session_scope(ctx.engine) as session:
            rows = session.execute(
                select(SigningRequest.workflow_id).where(  # type: ignore[call-overload]
                    SigningRequest.signer_id == body.signer_id,
                    SigningRequest.requester_id == body.identity_id,
                    SigningRequest.status == "open",
                )
            ).all()
            return [r[0] for r in rows]

    row = await run_in_threadpool(create)
    # Requests already waiting are released: each claims the pre-approval through the same
    # activity as a new request, so a single-use one still serves exactly one of them.
    if ctx.temporal is not None:
        waiting = await run_in_threadpool(waiting_workflows)
        outcomes = await asyncio.gather(
            *(signal_pre_approval(ctx.temporal, w, row.id, row.not_before) for w in waiting),
            return_exceptions=True,
        )
        for workflow_id, outcome in zip(waiting, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                # The pre-approval stands and serves new requests; only this release is lost.
                log.warning("could not signal %s of pre-approval %s: %s", workflow_id, row.id, outcome)
    return public(row)


def _visible(principal: Principal) -> bool:
    return principal.is_admin or principal.has("codesign:approve") or principal.has("audit:read")


@router.get("/pki/pre-approvals", response_model=Page[PreApprovalPublic])
def list_pre_approvals(
    session: SessionDep,
    principal: CurrentPrincipal,
    page: PageDep,
    signer_id: Annotated[str | None, Query(alias="signerId")] = None,
) -> Page[PreApprovalPublic]:
    conditions = []
    if signer_id:
        conditions.append(PreApproval.signer_id == signer_id)
    if not _visible(principal):
        conditions.append(PreApproval.identity_id == principal.identity_id)
    total = session.execute(select(func.count()).select_from(PreApproval).where(*conditions)).scalar_one()
    rows = session.execute(
        select(PreApproval)
        .where(*conditions)
        .order_by(PreApproval.created_at.desc())
        .offset(page.offset)
        .limit(page.limit)
    ).all()
    return Page[PreApprovalPublic](items=[public(r[0]) for r in rows], total=total)


@router.get("/pki/pre-approvals/{pre_approval_id}", response_model=PreApprovalPublic)
def get_pre_approval(
    pre_approval_id: str, session: SessionDep, principal: CurrentPrincipal
) -> PreApprovalPublic:
    row = session.get(PreApproval, pre_approval_id)
    if row is None:
        raise NotFound("no such pre-approval")
    if not _visible(principal) and row.identity_id != principal.identity_id:
        raise Forbidden("you may not see this pre-approval")
    return public(row)


@router.delete("/pki/pre-approvals/{pre_approval_id}", status_code=204)
def revoke_pre_approval(
    pre_approval_id: str, session: SessionDep, principal: CurrentPrincipal, actor: ActorDep
) -> Response:
    """Its creator, another approver of the signer, or an admin may revoke it."""
    row = session.get(PreApproval, pre_approval_id, with_for_update=True)
    if row is None:
        raise NotFound("no such pre-approval")
    signer = session.get(Signer, row.signer_id)
    allowed = (
        principal.is_admin
        or row.created_by == principal.identity_id
        or (
            principal.has("codesign:approve")
            and signer is not None
            and _approver_of_signer(session, signer, principal.identity_id)
        )
    )
    if not allowed:
        raise Forbidden("you may not revoke this pre-approval")
    if row.status == "revoked":
        raise Conflict("the pre-approval is already revoked", code="pre_approval_not_active")
    row.status = "revoked"
    row.revoked_at = utcnow()
    session.add(row)
    audit.record(
        session,
        actor=actor,
        action="pre_approval.revoked",
        entity_type="pre_approval",
        entity_id=row.id,
        data={},
    )
    return Response(status_code=204)
