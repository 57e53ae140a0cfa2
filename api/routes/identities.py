"""Identities, API tokens and /me."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Response
from pydantic import Field
from sqlalchemy import func
from sqlmodel import select

from api.deps import ActorDep, AdminPrincipal, CurrentPrincipal, PageDep, SessionDep
from api.schemas import ApiModel, Page
from core.errors import NotFound
from store import identities as store
from store.models import Identity

router = APIRouter(tags=["identities"])

Scope = Literal["admin", "codesign:request", "codesign:approve", "codesign:sign", "audit:read"]


class IdentityCreate(ApiModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
    kind: Literal["user", "machine"]
    email: str | None = Field(default=None, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")


class IdentityPublic(ApiModel):
    id: str
    name: str
    kind: str
    email: str | None
    created_at: datetime


class MePublic(IdentityPublic):
    scopes: list[str]
    token_id: str


class TokenCreate(ApiModel):
    scopes: list[Scope] = Field(min_length=1)
    ttl_seconds: int | None = Field(default=None, ge=60, le=10 * 365 * 86400)


class TokenPublic(ApiModel):
    id: str
    token: str
    scopes: list[str]
    expires_at: datetime | None


def _public(identity: Identity) -> IdentityPublic:
    return IdentityPublic.model_validate(identity, from_attributes=True)


@router.post("/identities", status_code=201, response_model=IdentityPublic)
def create_identity(
    body: IdentityCreate, session: SessionDep, _: AdminPrincipal, actor: ActorDep
) -> IdentityPublic:
    identity = store.create_identity(
        session=session, name=body.name, kind=body.kind, email=body.email, actor=actor
    )
    return _public(identity)


@router.get("/identities", response_model=Page[IdentityPublic])
def list_identities(session: SessionDep, _: AdminPrincipal, page: PageDep) -> Page[IdentityPublic]:
    total = session.exec(select(func.count()).select_from(Identity)).one()
    rows = session.exec(
        select(Identity).order_by(Identity.created_at, Identity.id).offset(page.offset).limit(page.limit)  # type: ignore[arg-type]
    ).all()
    return Page[IdentityPublic](items=[_public(r) for r in rows], total=total)


@router.get("/identities/{identity_id}", response_model=IdentityPublic)
def get_identity(identity_id: str, session: SessionDep, _: AdminPrincipal) -> IdentityPublic:
    identity = session.get(Identity, identity_id)
    if identity is None:
        raise NotFound("no such identity")
    return _public(identity)


@router.get("/me", response_model=MePublic)
def me(principal: CurrentPrincipal, session: SessionDep) -> MePublic:
    identity = session.get(Identity, principal.identity_id)
    if identity is None:
        raise NotFound("no such identity")
    return MePublic(
        **_public(identity).model_dump(),
        scopes=sorted(principal.scopes),
        token_id=principal.token_id,
    )


@router.post("/identities/{identity_id}/tokens", status_code=201, response_model=TokenPublic)
def create_token(
    identity_id: str, body: TokenCreate, session: SessionDep, _: AdminPrincipal, actor: ActorDep
) -> TokenPublic:
    row, token = store.issue_token(
        session=session,
        identity_id=identity_id,
        scopes=list(body.scopes),
        ttl_seconds=body.ttl_seconds,
        actor=actor,
    )
    return TokenPublic(id=row.id, token=token, scopes=row.scopes, expires_at=row.expires_at)


@router.delete("/identities/{identity_id}/tokens/{token_id}", status_code=204)
def revoke_token(
    identity_id: str, token_id: str, session: SessionDep, _: AdminPrincipal, actor: ActorDep
) -> Response:
    store.revoke_token(session=session, identity_id=identity_id, token_id=token_id, actor=actor)
    return Response(status_code=204)
