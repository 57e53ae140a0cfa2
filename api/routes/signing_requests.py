"""Signing requests: each one a durable Temporal workflow; the API lists them from the database."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import Field, field_validator
from sqlalchemy import func, select
from sqlmodel import Session
from temporalio.service import RPCError

from api.context import AppContext
from api.deps import (
    ContextDep,
    CurrentPrincipal,
    PageDep,
    RequesterPrincipal,
    TemporalDep,
    actor_of,
    authenticated,
    bearer_token,
    check_scope,
    client_ip,
)
from api.schemas import ApiModel, Page
from api.temporal_calls import decide, start_request
from core.errors import BadRequest, Forbidden, NotEligible, NotFound, RequestNotOpen, SigngateError
from core.metrics import DECISION_SECONDS, DECISIONS, SIGNING_REQUESTS_OPENED
from core.schemas import TERMINAL_STATUSES, Artifact, DecisionInput, RequestState
from store import audit
from store.db import read_scope, session_scope
from store.identities import Principal, authenticate_on
from store.models import SigningRequest
from store.requests import build_request, load_request, read_state, resubmission_ids, state_of

log = logging.getLogger(__name__)
router = APIRouter(tags=["signing requests"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


class ArtifactIn(ApiModel):
    name: str | None = Field(default=None, max_length=512)
    digest: str = Field(min_length=1, max_length=200)
    digest_algorithm: Literal["SHA256", "SHA384", "SHA512"]
    signing_algorithm: str = Field(max_length=40)
    format: Literal["raw", "cms"] = "raw"


def _bounded_metadata(value: dict[str, Any] | None, what: str) -> dict[str, Any]:
    import json

    value = value or {}
    if len(json.dumps(value)) > 8192:
        raise ValueError(f"{what} must be at most 8 KiB of JSON")
    return value


class RequestCreate(ApiModel):
    signer_id: str = Field(min_length=1, max_length=64)
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    allowed_sign_operations: int | None = Field(default=None, ge=1, le=1_000_000)
    justification: str | None = Field(default=None, max_length=4000)
    artifact: ArtifactIn | None = None
    origin: dict[str, str] | None = None
    client_metadata: dict[str, Any] | None = None

    @field_validator("origin")
    @classmethod
    def _origin(cls, v: dict[str, str] | None) -> dict[str, str]:
        return _bounded_metadata(v, "origin")

    @field_validator("client_metadata")
    @classmethod
    def _metadata(cls, v: dict[str, Any] | None) -> dict[str, Any]:
        return _bounded_metadata(v, "clientMetadata")


class DecisionBody(ApiModel):
    comment: str | None = Field(default=None, max_length=4000)


class ResubmitBody(ApiModel):
    signer_id: str = Field(min_length=1, max_length=64)
    justification: str | None = Field(default=None, max_length=4000)


class ApprovalOut(ApiModel):
    approver_id: str
    approver_name: str
    decision: str
    comment: str | None
    at: datetime


class StepOut(ApiModel):
    name: str
    required_approvals: int
    approver_ids: list[str]
    status: str
    approvals: list[ApprovalOut]


class ArtifactOut(ApiModel):
    name: str | None
    digest: str
    digest_algorithm: str
    signing_algorithm: str
    format: str


class RequestPublic(ApiModel):
    id: str
    workflow_id: str
    status: str
    signer_id: str
    signer_name: str
    signing_policy_id: str | None
    signing_policy_name: str | None
    requester_id: str
    requester_name: str
    justification: str | None
    valid_from: datetime
    valid_until: datetime
    allowed_sign_operations: int
    artifact: ArtifactOut | None
    origin: dict[str, str]
    client_metadata: dict[str, Any]
    current_step: int | None
    steps: list[StepOut]
    pre_approval_id: str | None
    grant_id: str | None
    signature: str | None
    signing_error: str | None
    bypass: str | None
    original_request_id: str | None
    resubmission_ids: list[str]
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None


def _member_of_body_signer(signer_id: str, principal: Principal, ctx: Any) -> Principal:
    from store.signers import membership

    with session_scope(ctx.engine) as session:
        member = membership(session, signer_id=signer_id, identity_id=principal.identity_id)
    if member is None:
        raise NotFound("no such signer")
    if not member:
        raise Forbidden("the caller is not a member of this signer", code="not_member")
    return principal


def requesting_member(body: RequestCreate, principal: RequesterPrincipal, ctx: ContextDep) -> Principal:
    """Dependency: codesign:request and membership of the signer the body names."""
    return _member_of_body_signer(body.signer_id, principal, ctx)


def resubmitting_member(body: ResubmitBody, principal: RequesterPrincipal, ctx: ContextDep) -> Principal:
    """Dependency: codesign:request and membership of the signer the request moves to."""
    return _member_of_body_signer(body.signer_id, principal, ctx)


RequestingMember = Annotated[Principal, Depends(requesting_member)]
ResubmittingMember = Annotated[Principal, Depends(resubmitting_member)]


def public(state: RequestState, resubmissions: list[str] | None = None) -> RequestPublic:
    data = state.model_dump()
    data["resubmission_ids"] = resubmissions if resubmissions is not None else state.resubmission_ids
    return RequestPublic.model_validate(data)


def _may_view(principal: Principal, state: RequestState) -> bool:
    if principal.identity_id == state.requester_id:
        return True
    if principal.is_admin or principal.has("audit:read"):
        return True
    return principal.has("codesign:approve") and any(
        principal.identity_id in s.approver_ids for s in state.steps
    )


def _load_visible(session: Session, request_id: str, principal: Principal) -> SigningRequest:
    row = load_request(session, request_id)
    if not _may_view(principal, state_of(row)):
        raise Forbidden("you may not see this request")
    return row


def _detail(ctx_engine: Any, request_id: str, principal: Principal) -> RequestPublic:
    with session_scope(ctx_engine) as session:
        row = _load_visible(session, request_id, principal)
        return public(state_of(row), resubmission_ids(session, request_id))


async def _open(
    ctx: Any,
    temporal: Any,
    principal: Principal,
    request: Request,
    idempotency_key: str | None,
    **kwargs: Any,
) -> tuple[RequestPublic, bool]:
    """Open a request; the flag is False when an Idempotency-Key replay found it already open."""
    from activities.requests import persist_request_state
    from core.schemas import PersistRequestInput, opened_note

    request_id = (
        str(uuid.uuid5(uuid.NAMESPACE_URL, f"signgate:{principal.identity_id}:{idempotency_key}"))
        if idempotency_key
        else None
    )
    if request_id is not None:
        with session_scope(ctx.engine) as session:
            existing = session.get(SigningRequest, request_id)
            if existing is not None:
                return public(state_of(existing), resubmission_ids(session, request_id)), False

    def build() -> Any:
        with session_scope(ctx.engine) as session:
            return build_request(
                session=session,
                principal=principal,
                ip_address=client_ip(request),
                request_id=request_id,
                **kwargs,
            )

    workflow_input = await run_in_threadpool(build)
    await start_request(temporal, ctx.settings.task_queue, workflow_input)
    SIGNING_REQUESTS_OPENED.inc()
    # The workflow records the request too; writing version 0 here makes it listable at once.
    # Whichever write inserts the row records the `opened` event with it.
    await run_in_threadpool(
        persist_request_state,
        ctx.engine,
        PersistRequestInput(state=workflow_input.request, notes=[opened_note(workflow_input.request)]),
    )
    if not workflow_input.pre_approval_possible:
        await _release_if_pre_approved(ctx, temporal, workflow_input.request)
    return public(workflow_input.request, []), True


async def _release_if_pre_approved(ctx: Any, temporal: Any, state: RequestState) -> None:
    """The workflow was told no pre-approval existed, so it does not claim one at once. One
    made since is looked for again now that the request is committed (one made later finds the
    request when it looks for waiting ones), and signalled like those."""
    from api.temporal_calls import signal_pre_approval
    from store.requests import pre_approval_in_sight

    def look() -> tuple[str, datetime] | None:
        with session_scope(ctx.engine) as session:
            return pre_approval_in_sight(session, state.signer_id, state.requester_id)

    found = await run_in_threadpool(look)
    if found is not None:
        try:
            await signal_pre_approval(temporal, state.workflow_id, found[0], found[1])
        except SigngateError as exc:
            # The workflow's own deferred claim still finds it, later.
            log.warning("could not signal %s of a new pre-approval: %s", state.workflow_id, exc)


@router.post("/pki/signing-requests", status_code=201, response_model=RequestPublic)
async def create_request(
    body: RequestCreate,
    request: Request,
    ctx: ContextDep,
    temporal: TemporalDep,
    principal: RequestingMember,
    idempotency_key: IdempotencyKey = None,
) -> RequestPublic:
    opened, _ = await _open(
        ctx,
        temporal,
        principal,
        request,
        idempotency_key,
        signer_id=body.signer_id,
        valid_from=body.valid_from,
        valid_until=body.valid_until,
        allowed_sign_operations=body.allowed_sign_operations,
        justification=body.justification,
        artifact=Artifact(**body.artifact.model_dump()) if body.artifact else None,
        origin=body.origin or {},
        client_metadata=body.client_metadata or {},
    )
    return opened


@router.get("/pki/signing-requests", response_model=Page[RequestPublic])
def list_requests(
    ctx: ContextDep,
    principal: CurrentPrincipal,
    page: PageDep,
    status: str | None = None,
    signer_id: Annotated[str | None, Query(alias="signerId")] = None,
    requester_id: Annotated[str | None, Query(alias="requesterId")] = None,
) -> Page[RequestPublic]:
    conditions = []
    if status:
        statuses = [s.strip() for s in status.split(",") if s.strip()]
        unknown = set(statuses) - {"open", *TERMINAL_STATUSES}
        if unknown:
            raise BadRequest(f"unknown status {sorted(unknown)[0]!r}", code="invalid_request")
        conditions.append(SigningRequest.status.in_(statuses))  # type: ignore[attr-defined]
    if signer_id:
        conditions.append(SigningRequest.signer_id == signer_id)
    if requester_id:
        conditions.append(SigningRequest.requester_id == requester_id)
    sees_all = principal.is_admin or principal.has("audit:read") or principal.has("codesign:approve")
    if not sees_all:
        conditions.append(SigningRequest.requester_id == principal.identity_id)
    with session_scope(ctx.engine) as session:
        total = session.execute(
            select(func.count()).select_from(SigningRequest).where(*conditions)
        ).scalar_one()
        rows = session.execute(
            select(SigningRequest.state)  # type: ignore[call-overload]
            .where(*conditions)
            .order_by(SigningRequest.created_at.desc(), SigningRequest.id)  # type: ignore[attr-defined]
            .offset(page.offset)
            .limit(page.limit)
        ).all()
    return Page[RequestPublic](items=[public(RequestState.model_validate(r[0])) for r in rows], total=total)


@router.get("/pki/signing-requests/{request_id}", response_model=RequestPublic)
async def get_request(request_id: str, ctx: ContextDep, principal: CurrentPrincipal) -> RequestPublic:
    return await run_in_threadpool(_detail, ctx.engine, request_id, principal)


@dataclass(frozen=True)
class Decider:
    """The caller of a decision and the request as last written."""

    principal: Principal
    request: RequestState


def _decider(scope: str | None) -> Callable[[str, Request, AppContext], Awaitable[Decider]]:
    """Dependency: the caller (with `scope`) and the request it decides, read on one connection
    in one trip to the thread pool (the checks answer as `current_principal`, the scope check
    and `read_state` would, in that order)."""

    async def resolve(request_id: str, request: Request, ctx: ContextDep) -> Decider:
        token = bearer_token(request)

        def read() -> tuple[Principal | None, RequestState | None]:
            with read_scope(ctx.engine) as conn:
                principal = authenticate_on(conn, token)
                if principal is None or (scope is not None and not principal.has(scope)):
                    return principal, None
                return principal, read_state(conn, request_id)

        principal, state = await run_in_threadpool(read)
        principal = authenticated(request, principal)
        if scope is not None:
            check_scope(principal, scope)
        assert state is not None
        return Decider(principal=principal, request=state)

    return resolve


ApprovingDecider = Annotated[Decider, Depends(_decider("codesign:approve"))]
AnyDecider = Annotated[Decider, Depends(_decider(None))]


async def _decide(
    update: str,
    body: DecisionBody | None,
    ctx: Any,
    temporal: Any,
    decider: Decider,
    idempotency_key: str | None,
) -> RequestPublic:
    principal, state = decider.principal, decider.request
    if update == "cancel" and not (principal.identity_id == state.requester_id or principal.is_admin):
        raise Forbidden("only the requester or an admin may cancel")
    if update != "cancel" and not _may_view(principal, state):
        raise NotEligible("you are not among the approvers of this request")
    if state.status != "open":
        raise RequestNotOpen(f"the request is {state.status}")
    outcome = "error"
    with DECISION_SECONDS.time():
        try:
            result = await decide(
                temporal,
                state.workflow_id,
                update,
                DecisionInput(
                    actor_id=principal.identity_id,
                    actor_name=principal.name,
                    actor_is_admin=principal.is_admin,
                    comment=body.comment if body else None,
                ),
                idempotency_key=f"{update}:{principal.identity_id}:{idempotency_key}"
                if idempotency_key
                else None,
                rpc_timeout=ctx.settings.update_rpc_timeout_seconds,
            )
            outcome = "accepted"
        except SigngateError as exc:
            outcome = exc.code
            raise
        finally:
            DECISIONS.labels(decision=update, outcome=outcome).inc()
    return public(result)


@router.post("/pki/signing-requests/{request_id}/approve", response_model=RequestPublic)
async def approve(
    request_id: str,
    ctx: ContextDep,
    temporal: TemporalDep,
    decider: ApprovingDecider,
    body: DecisionBody | None = None,
    idempotency_key: IdempotencyKey = None,
) -> RequestPublic:
    return await _decide("approve", body, ctx, temporal, decider, idempotency_key)


@router.post("/pki/signing-requests/{request_id}/reject", response_model=RequestPublic)
async def reject(
    request_id: str,
    ctx: ContextDep,
    temporal: TemporalDep,
    decider: ApprovingDecider,
    body: DecisionBody | None = None,
    idempotency_key: IdempotencyKey = None,
) -> RequestPublic:
    return await _decide("reject", body, ctx, temporal, decider, idempotency_key)


@router.post("/pki/signing-requests/{request_id}/cancel", response_model=RequestPublic)
async def cancel(
    request_id: str,
    ctx: ContextDep,
    temporal: TemporalDep,
    decider: AnyDecider,
    body: DecisionBody | None = None,
    idempotency_key: IdempotencyKey = None,
) -> RequestPublic:
    return await _decide("cancel", body, ctx, temporal, decider, idempotency_key)


@router.post("/pki/signing-requests/{request_id}/resubmit", status_code=201, response_model=RequestPublic)
async def resubmit(
    request_id: str,
    body: ResubmitBody,
    request: Request,
    ctx: ContextDep,
    temporal: TemporalDep,
    principal: ResubmittingMember,
    idempotency_key: IdempotencyKey = None,
) -> RequestPublic:
    def load() -> RequestState:
        with session_scope(ctx.engine) as session:
            return state_of(_load_visible(session, request_id, principal))

    original = await run_in_threadpool(load)
    if original.status != "approved":
        raise RequestNotOpen(
            f"only an approved request can be resubmitted; this one is {original.status}",
            code="request_not_approved",
        )
    created, is_new = await _open(
        ctx,
        temporal,
        principal,
        request,
        idempotency_key,
        signer_id=body.signer_id,
        valid_from=None,
        valid_until=None,
        allowed_sign_operations=None,
        justification=body.justification if body.justification is not None else original.justification,
        artifact=original.artifact,
        origin=original.origin,
        client_metadata=original.client_metadata,
        original_request_id=original.id,
    )

    def record_link() -> None:
        with session_scope(ctx.engine) as session:
            audit.record(
                session,
                actor=actor_of(principal, request),
                action="signing_request.resubmitted",
                entity_type="signing_request",
                entity_id=original.id,
                request_id=original.id,
                data={
                    "resubmissionId": created.id,
                    "signerId": created.signer_id,
                    "signerName": created.signer_name,
                },
            )

    if is_new:
        await run_in_threadpool(record_link)
    return created


@router.get("/pki/signing-requests/{request_id}/result", response_model=RequestPublic)
async def wait_for_result(
    request_id: str,
    ctx: ContextDep,
    temporal: TemporalDep,
    principal: CurrentPrincipal,
    wait_seconds: Annotated[float, Query(alias="waitSeconds", ge=0)] = 0,
) -> RequestPublic:
    """Long-poll the workflow's completion (at most 300 s), then answer the request as it stands."""
    detail = await run_in_threadpool(_detail, ctx.engine, request_id, principal)
    if detail.status in TERMINAL_STATUSES or wait_seconds <= 0:
        return detail
    handle = temporal.get_workflow_handle(detail.workflow_id)
    try:
        await asyncio.wait_for(handle.result(), timeout=min(wait_seconds, 300.0))
    except (TimeoutError, RPCError):
        pass
    except Exception as exc:  # a failed workflow still leaves the database answer authoritative
        log.warning("workflow %s ended abnormally: %s", detail.workflow_id, exc)
    return await run_in_threadpool(_detail, ctx.engine, request_id, principal)
