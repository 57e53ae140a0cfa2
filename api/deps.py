"""Annotated dependencies: context, sessions, the caller, and the scope checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session
from temporalio.client import Client

from api.context import AppContext
from core.errors import Forbidden, Unauthorized, Unavailable
from store import audit
from store.db import session_scope
from store.identities import Principal, authenticate


def get_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


# Dependencies that do no I/O are coroutines: FastAPI runs a plain function on its thread pool,
# one hop there and back for each, on every call that depends on it.
async def _context(request: Request) -> AppContext:
    return get_context(request)


ContextDep = Annotated[AppContext, Depends(_context)]


def get_session(ctx: ContextDep) -> Iterator[Session]:
    with session_scope(ctx.engine) as session:
        yield session


# scope="function": commit before the answer is sent, so an acknowledged change is durable and
# visible to the next call (the default would commit after the response).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_temporal(ctx: ContextDep) -> Client:
    if ctx.temporal is None:
        raise Unavailable("Temporal is unreachable")
    return ctx.temporal


TemporalDep = Annotated[Client, Depends(get_temporal)]


def client_ip(request: Request) -> str | None:
    """The address the API saw the call come from; never a header the client could set."""
    return request.client.host if request.client else None


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("a valid bearer token is required")
    return token.strip()


def authenticated(request: Request, principal: Principal | None) -> Principal:
    """The caller `authenticate` found for the request's token; 401 when there is none."""
    if principal is None:
        raise Unauthorized("a valid bearer token is required")
    request.state.principal = principal
    return principal


async def current_principal(request: Request, ctx: ContextDep) -> Principal:
    token = bearer_token(request)
    return authenticated(request, await run_in_threadpool(authenticate, ctx.engine, token))


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def check_scope(principal: Principal, scope: str) -> Principal:
    if not principal.has(scope):
        raise Forbidden(f"this call needs the {scope} scope")
    return principal


def require_scope(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    async def check(principal: CurrentPrincipal) -> Principal:
        return check_scope(principal, scope)

    check.__name__ = f"require_{scope.replace(':', '_')}"
    return check


def require_any_scope(*scopes: str) -> Callable[[Principal], Awaitable[Principal]]:
    async def check(principal: CurrentPrincipal) -> Principal:
        if not any(principal.has(s) for s in scopes):
            raise Forbidden("this call needs one of the scopes " + ", ".join(scopes))
        return principal

    return check


AdminPrincipal = Annotated[Principal, Depends(require_scope("admin"))]
RequesterPrincipal = Annotated[Principal, Depends(require_scope("codesign:request"))]
ApproverPrincipal = Annotated[Principal, Depends(require_scope("codesign:approve"))]
SignerPrincipal = Annotated[Principal, Depends(require_scope("codesign:sign"))]
AuditorPrincipal = Annotated[Principal, Depends(require_scope("audit:read"))]


def actor_of(principal: Principal, request: Request) -> audit.Actor:
    return audit.Actor(id=principal.identity_id, name=principal.name, ip_address=client_ip(request))


async def get_actor(principal: CurrentPrincipal, request: Request) -> audit.Actor:
    return actor_of(principal, request)


ActorDep = Annotated[audit.Actor, Depends(get_actor)]


class Pagination:
    def __init__(self, limit: int = 50, offset: int = 0) -> None:
        from core.errors import BadRequest

        if not 1 <= limit <= 500:
            raise BadRequest("limit must be between 1 and 500", code="invalid_request")
        if offset < 0:
            raise BadRequest("offset must not be negative", code="invalid_request")
        self.limit = limit
        self.offset = offset


PageDep = Annotated[Pagination, Depends(Pagination)]
