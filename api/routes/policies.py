"""Signing policies (admin)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response
from pydantic import Field, model_validator
from sqlalchemy import func
from sqlmodel import select

from api.deps import ActorDep, AdminPrincipal, CurrentPrincipal, PageDep, SessionDep
from api.schemas import ApiModel, Page
from store import policies as store
from store.models import SigningPolicy

router = APIRouter(tags=["signing policies"])


class StepIn(ApiModel):
    name: str = Field(min_length=1, max_length=64)
    approver_ids: list[str] = Field(min_length=1, max_length=100)
    required_approvals: int = Field(ge=1)


class PolicyCreate(ApiModel):
    name: str = Field(min_length=1, max_length=128)
    steps: list[StepIn] = Field(min_length=1, max_length=20)
    max_window_seconds: int | None = Field(default=None, ge=1)
    max_signings: int | None = Field(default=None, ge=1)
    request_ttl_seconds: int | None = Field(default=None, ge=1, le=366 * 86400)
    allow_machine_bypass: bool = False


class PolicyUpdate(ApiModel):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    steps: list[StepIn] | None = Field(default=None, min_length=1, max_length=20)
    max_window_seconds: int | None = Field(default=None, ge=1)
    max_signings: int | None = Field(default=None, ge=1)
    request_ttl_seconds: int | None = Field(default=None, ge=1, le=366 * 86400)
    allow_machine_bypass: bool | None = None

    @model_validator(mode="after")
    def _no_nulls_for_required(self) -> PolicyUpdate:
        for name in ("name", "steps", "allow_machine_bypass"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class StepOut(ApiModel):
    name: str
    approver_ids: list[str]
    required_approvals: int


class PolicyPublic(ApiModel):
    id: str
    name: str
    steps: list[StepOut]
    max_window_seconds: int | None
    max_signings: int | None
    request_ttl_seconds: int
    allow_machine_bypass: bool
    created_at: datetime
    updated_at: datetime


def public(policy: SigningPolicy) -> PolicyPublic:
    return PolicyPublic(
        id=policy.id,
        name=policy.name,
        steps=[StepOut.model_validate(s) for s in policy.steps],
        max_window_seconds=policy.max_window_seconds,
        max_signings=policy.max_signings,
        request_ttl_seconds=policy.request_ttl_seconds,
        allow_machine_bypass=policy.allow_machine_bypass,
        created_at=policy.created_at,
        updated_at=policy.updated_at,
    )


@router.post("/pki/signing-policies", status_code=201, response_model=PolicyPublic)
def create_policy(
    body: PolicyCreate, session: SessionDep, _: AdminPrincipal, actor: ActorDep
) -> PolicyPublic:
    data = body.model_dump(by_alias=True)
    return public(store.create_policy(session=session, body=data, actor=actor))


@router.get("/pki/signing-policies", response_model=Page[PolicyPublic])
def list_policies(session: SessionDep, _: CurrentPrincipal, page: PageDep) -> Page[PolicyPublic]:
    total = session.exec(select(func.count()).select_from(SigningPolicy)).one()
    rows = session.exec(
        select(SigningPolicy)
        .order_by(SigningPolicy.created_at, SigningPolicy.id)
        .offset(page.offset)
        .limit(page.limit)  # type: ignore[arg-type]
    ).all()
    return Page[PolicyPublic](items=[public(r) for r in rows], total=total)


@router.get("/pki/signing-policies/{policy_id}", response_model=PolicyPublic)
def get_policy(policy_id: str, session: SessionDep, _: CurrentPrincipal) -> PolicyPublic:
    return public(store.get_policy(session, policy_id))


@router.patch("/pki/signing-policies/{policy_id}", response_model=PolicyPublic)
def update_policy(
    policy_id: str, body: PolicyUpdate, session: SessionDep, _: AdminPrincipal, actor: ActorDep
) -> PolicyPublic:
    changes = body.model_dump(by_alias=True, exclude_unset=True)
    return public(store.update_policy(session=session, policy_id=policy_id, changes=changes, actor=actor))


@router.delete("/pki/signing-policies/{policy_id}", status_code=204)
def delete_policy(policy_id: str, session: SessionDep, _: AdminPrincipal, actor: ActorDep) -> Response:
    store.delete_policy(session=session, policy_id=policy_id, actor=actor)
    return Response(status_code=204)
