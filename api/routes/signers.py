"""Signers: management (admin), membership, the sign and verify calls, and the operation log.

Who may touch a signer is decided by dependencies (`SignerAccess`), never by code at the top of
a handler: reading a signer, its certificate or verifying needs membership or admin. Signing
needs `codesign:sign` and membership (admin alone is not enough); the sign call is the hot path,
so those checks run in its batch transaction (`store.fastsign`), still on every call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from pydantic import Field, ValidationError, model_validator
from starlette.types import Receive, Scope, Send

from api.context import AppContext
from api.deps import (
    ActorDep,
    AdminPrincipal,
    ContextDep,
    CurrentPrincipal,
    PageDep,
    SessionDep,
    client_ip,
    get_context,
    require_any_scope,
)
from api.errors import internal_error_response
from api.http import BareAnswer
from api.schemas import ApiModel, Page
from core.errors import BadRequest, Forbidden, NotFound, SigngateError, Unauthorized
from pki.algorithms import supported_algorithms
from store import signers as store
from store.db import session_scope
from store.fastsign import SignBatcher, SignCall
from store.identities import Principal
from store.models import Identity, Signer
from store.signing import SignResult

log = logging.getLogger("signgate.api")

router = APIRouter(tags=["signers"])

PEM_MEDIA_TYPE = "application/x-pem-file"
MAX_CLIENT_METADATA_CHARS = 8192


class SignerAccess:
    """Dependency: the caller may use the signer named in the path.

    `scope` is required on the token in any case; `admin_may` lets an admin through without
    membership (reading), which signing never does. Unknown signer → 404, other refusals → 403.
    """

    def __init__(self, *, scope: str | None, admin_may: bool) -> None:
        self.scope = scope
        self.admin_may = admin_may

    def __call__(self, signer_id: str, principal: CurrentPrincipal, ctx: ContextDep) -> Principal:
        if self.scope is not None and not principal.has(self.scope):
            raise Forbidden(f"this call needs the {self.scope} scope")
        with session_scope(ctx.engine) as session:
            member = store.membership(session, signer_id=signer_id, identity_id=principal.identity_id)
        if member is None:
            raise NotFound("no such signer")
        if not member and not (self.admin_may and principal.is_admin):
            raise Forbidden("the caller is not a member of this signer", code="not_member")
        return principal


MemberOrAdmin = Annotated[Principal, Depends(SignerAccess(scope=None, admin_may=True))]
OperationsReader = Annotated[Principal, Depends(require_any_scope("admin", "audit:read"))]


class SignerCreate(ApiModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = Field(default=None, max_length=4000)
    certificate_id: str = Field(min_length=1, max_length=64)
    signing_policy_id: str | None = Field(default=None, max_length=64)


class SignerUpdate(ApiModel):
    description: str | None = Field(default=None, max_length=4000)
    signing_policy_id: str | None = Field(default=None, max_length=64)
    status: Literal["active", "disabled"] | None = None
    certificate_id: str | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _no_nulls_for_required(self) -> SignerUpdate:
        for name in ("status", "certificate_id"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class SignerPublic(ApiModel):
    id: str
    name: str
    description: str | None
    certificate_id: str
    signing_policy_id: str | None
    status: str
    key_algorithm: str
    supported_algorithms: list[str]
    created_at: datetime
    updated_at: datetime


class MembersSet(ApiModel):
    identity_ids: list[str] = Field(max_length=store.MAX_MEMBERS)


class MemberPublic(ApiModel):
    id: str
    name: str
    kind: str


class SignIn(ApiModel):
    data: str
    signing_algorithm: str = Field(max_length=64)
    is_digest: bool = False
    client_metadata: dict[str, Any] | None = None


class SignOut(ApiModel):
    signature: str
    signing_algorithm: str
    signer_id: str
    grant_id: str | None
    operation_id: str


class VerifyIn(ApiModel):
    data: str
    signature: str
    signing_algorithm: str = Field(max_length=64)
    is_digest: bool = False


class VerifyOut(ApiModel):
    valid: bool


class OperationPublic(ApiModel):
    id: str
    at: datetime
    actor_id: str
    actor_name: str | None
    status: str
    signing_algorithm: str
    data_sha256: str
    grant_id: str | None
    request_id: str | None
    client_metadata: dict[str, Any] | None
    ip_address: str | None
    error: str | None


def public(signer: Signer, key_algorithm: str) -> SignerPublic:
    return SignerPublic(
        id=signer.id,
        name=signer.name,
        description=signer.description,
        certificate_id=signer.certificate_id,
        signing_policy_id=signer.signing_policy_id,
        status=signer.status,
        key_algorithm=key_algorithm,
        supported_algorithms=supported_algorithms(key_algorithm),
        created_at=signer.created_at,
        updated_at=signer.updated_at,
    )


def _public_one(session: SessionDep, signer: Signer) -> SignerPublic:
    return public(signer, store.key_algorithms(session, [signer.certificate_id])[signer.certificate_id])


def _members_page(members: list[Identity]) -> Page[MemberPublic]:
    return Page[MemberPublic](
        items=[MemberPublic(id=m.id, name=m.name, kind=m.kind) for m in members], total=len(members)
    )


@router.post("/pki/signers", status_code=201, response_model=SignerPublic)
def create_signer(
    body: SignerCreate, session: SessionDep, _: AdminPrincipal, actor: ActorDep
) -> SignerPublic:
    signer = store.create_signer(
        session=session,
        name=body.name,
        description=body.description,
        certificate_id=body.certificate_id,
        signing_policy_id=body.signing_policy_id,
        actor=actor,
    )
    return _public_one(session, signer)


@router.get("/pki/signers", response_model=Page[SignerPublic])
def list_signers(session: SessionDep, principal: CurrentPrincipal, page: PageDep) -> Page[SignerPublic]:
    """An admin sees every signer; anyone else the signers they are a member of."""
    rows, total = store.list_signers(
        session,
        member_id=None if principal.is_admin else principal.identity_id,
        limit=page.limit,
        offset=page.offset,
    )
    algorithms = store.key_algorithms(session, sorted({r.certificate_id for r in rows}))
    return Page[SignerPublic](items=[public(r, algorithms[r.certificate_id]) for r in rows], total=total)


@router.get("/pki/signers/{signer_id}", response_model=SignerPublic)
def get_signer(signer_id: str, session: SessionDep, _: MemberOrAdmin) -> SignerPublic:
    return _public_one(session, store.get_signer(session, signer_id))


@router.patch("/pki/signers/{signer_id}", response_model=SignerPublic)
def update_signer(
    signer_id: str,
    body: SignerUpdate,
    session: SessionDep,
    ctx: ContextDep,
    _: AdminPrincipal,
    actor: ActorDep,
) -> SignerPublic:
    signer = store.update_signer(
        session=session,
        key_store=ctx.key_store,
        signer_id=signer_id,
        changes=body.model_dump(exclude_unset=True),
        actor=actor,
    )
    return _public_one(session, signer)


@router.delete("/pki/signers/{signer_id}", status_code=204)
def delete_signer(
    signer_id: str, session: SessionDep, ctx: ContextDep, _: AdminPrincipal, actor: ActorDep
) -> Response:
    store.delete_signer(session=session, key_store=ctx.key_store, signer_id=signer_id, actor=actor)
    return Response(status_code=204)


@router.put("/pki/signers/{signer_id}/members", response_model=Page[MemberPublic])
def set_members(
    signer_id: str, body: MembersSet, session: SessionDep, _: AdminPrincipal, actor: ActorDep
) -> Page[MemberPublic]:
    members = store.set_members(
        session=session, signer_id=signer_id, identity_ids=body.identity_ids, actor=actor
    )
    return _members_page(members)


@router.get("/pki/signers/{signer_id}/members", response_model=Page[MemberPublic])
def list_members(signer_id: str, session: SessionDep, _: MemberOrAdmin) -> Page[MemberPublic]:
    return _members_page(store.list_members(session, signer_id))


@router.get(
    "/pki/signers/{signer_id}/certificate",
    response_class=Response,
    responses={200: {"content": {PEM_MEDIA_TYPE: {}}}},
)
def get_certificate(signer_id: str, session: SessionDep, _: MemberOrAdmin) -> Response:
    return Response(content=store.signer_chain_pem(session, signer_id), media_type=PEM_MEDIA_TYPE)


def _describe(errors: list[Any]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is malformed"


def _read_sign_body(raw: bytes, content_type: str | None) -> tuple[SignIn | None, BadRequest | None]:
    """The body, or the error to answer once the caller is known to be allowed.

    Only JSON that does not parse is refused before the token is checked, as for every other
    route; a schema error is the caller's to hear only if they may sign.
    """
    if content_type is not None:
        media = content_type.partition(";")[0].strip().lower()
        if not (media == "application/json" or media.endswith("+json")):
            return None, BadRequest("body: Input should be a valid dictionary", code="invalid_request")
    if not raw:
        return None, BadRequest("body: Field required", code="invalid_request")
    try:
        body = SignIn.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise BadRequest(_describe(errors), code="invalid_request") from exc
        return None, BadRequest(_describe(errors), code="invalid_request")
    if body.client_metadata is not None:
        if len(json.dumps(body.client_metadata, default=str)) > MAX_CLIENT_METADATA_CHARS:
            return body, BadRequest(
                f"clientMetadata must be at most {MAX_CLIENT_METADATA_CHARS} characters as JSON",
                code="invalid_client_metadata",
            )
    return body, None


def sign_batcher(ctx: AppContext) -> SignBatcher:
    batcher = ctx.extra.get("sign_batcher")
    if batcher is None:
        batcher = ctx.extra["sign_batcher"] = SignBatcher(ctx.engine, ctx.key_store)
    return cast(SignBatcher, batcher)


@router.post(
    "/pki/signers/{signer_id}/sign",
    response_model=SignOut,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": SignIn.model_json_schema(by_alias=True)}},
        }
    },
)
async def sign(signer_id: str, request: Request) -> Response:
    """Sign up to 128 bytes (or their digest); every attempt past input checks is recorded.

    Needs `codesign:sign` and membership, checked in the sign batch (`store.fastsign`) rather
    than by `SignerAccess`: the token, membership, grant and record then cost one visit to
    the database, shared with the calls that arrive alongside.

    Served by `FastSignEndpoint` (installed ahead of the middleware by `install_fast_sign`);
    this handler documents the call in the OpenAPI document and answers the same way should
    the app be built without the fast route.
    """
    headers = request.headers
    status, content, extra = await _sign_answer(
        get_context(request),
        signer_id,
        await request.body(),
        headers.get("content-type"),
        headers.get("authorization", ""),
        client_ip(request),
    )
    return Response(content=content, status_code=status, media_type="application/json", headers=extra)


_JSON_HEADER = (b"content-type", b"application/json")
_UNAUTHORIZED_HEADER = (b"www-authenticate", b"Bearer")


# json.dumps with any non-default option builds an encoder per call; these are built once.
_ERROR_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ANSWER_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _error_body(exc: SigngateError) -> bytes:
    # As `api.errors.error_response` (a JSONResponse) renders it.
    content = {"error": exc.code, "error_description": exc.description}
    return _ERROR_ENCODER.encode(content).encode()


def _sign_call(
    signer_id: str, raw: bytes, content_type: str | None, authorization: str, ip_address: str | None
) -> SignCall:
    """The batch's call for one sign request; SigngateError for what is answered before it."""
    body, input_error = _read_sign_body(raw, content_type)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("a valid bearer token is required")
    return SignCall(
        signer_id=signer_id,
        signing_algorithm=body.signing_algorithm if body is not None else "",
        data_b64=body.data if body is not None else "",
        is_digest=body.is_digest if body is not None else False,
        client_metadata=body.client_metadata if body is not None else None,
        token=token.strip(),
        ip_address=ip_address,
        input_error=input_error,
    )


def _refusal(exc: SigngateError) -> tuple[int, bytes, dict[str, str] | None]:
    extra = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return exc.status_code, _error_body(exc), extra


def _signed(result: SignResult) -> tuple[int, bytes, dict[str, str] | None]:
    answer = {
        "signature": base64.b64encode(result.signature).decode("ascii"),
        "signingAlgorithm": result.signing_algorithm,
        "signerId": result.signer_id,
        "grantId": result.grant_id,
        "operationId": result.operation_id,
    }
    return 200, _ANSWER_ENCODER.encode(answer).encode(), None


async def _sign_answer(
    ctx: AppContext,
    signer_id: str,
    raw: bytes,
    content_type: str | None,
    authorization: str,
    ip_address: str | None,
) -> tuple[int, bytes, dict[str, str] | None]:
    """(status, JSON body, extra headers) of one sign call (`_sign_call`, `_refusal`, `_signed`
    are the one place its answers are made; `FastSignEndpoint.submit` uses them without a task)."""
    try:
        result = await sign_batcher(ctx).sign(
            _sign_call(signer_id, raw, content_type, authorization, ip_address)
        )
    except SigngateError as exc:
        return _refusal(exc)
    return _signed(result)


def _bare(answer: tuple[int, bytes, dict[str, str] | None]) -> BareAnswer:
    status, content, extra = answer
    return status, content, (_UNAUTHORIZED_HEADER,) if extra is not None else ()


class FastSignEndpoint:
    """The sign call as a bare ASGI app: no dependency injection, no Request or Response objects.

    Reads the body and the two headers it needs and writes one pre-encoded answer; the rules
    and the answers are `_sign_call`'s, `_refusal`'s and `_signed`'s, shared with `sign`.
    `submit` is the same call without ASGI and without a task, for
    `api.http.SigngateHttpProtocol`; `answer` awaits it.
    """

    def submit(
        self,
        app: Any,
        path_params: dict[str, str],
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        client: str | None,
        on_answer: Callable[[BareAnswer], None],
    ) -> None:
        """Hand the call to the sign batcher; `on_answer` gets its answer, on the event loop
        (at once for a request answered before the batch). An unexpected failure of its batch
        is logged and answered with the contract's 500."""
        content_type: str | None = None
        authorization: str | None = None
        for name, value in headers:
            if name == b"content-type":
                if content_type is None:
                    content_type = value.decode("latin-1")
            elif name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
        try:
            call = _sign_call(path_params["signer_id"], body, content_type, authorization or "", client)
        except SigngateError as exc:
            on_answer(_bare(_refusal(exc)))
            return

        def answered(outcome: SignResult | BaseException) -> None:
            if isinstance(outcome, SigngateError):
                on_answer(_bare(_refusal(outcome)))
            elif isinstance(outcome, BaseException):
                log.error("sign call failed", exc_info=outcome)
                on_answer((500, bytes(internal_error_response().body), ()))
            else:
                on_answer(_bare(_signed(outcome)))

        sign_batcher(app.state.ctx).submit(call, answered)

    async def answer(
        self,
        app: Any,
        path_params: dict[str, str],
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        client: str | None,
    ) -> BareAnswer:
        answered: asyncio.Future[BareAnswer] = asyncio.get_running_loop().create_future()

        def settle(answer: BareAnswer) -> None:
            if not answered.done():  # a caller who went away leaves a cancelled future
                answered.set_result(answer)

        self.submit(app, path_params, headers, body, client, settle)
        return await answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        client = scope.get("client")
        status, content, extra = await self.answer(
            scope["app"],
            scope["path_params"],
            scope["headers"],
            chunks[0] if len(chunks) == 1 else b"".join(chunks),
            client[0] if client else None,
        )
        headers = [_JSON_HEADER, (b"content-length", str(len(content)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def install_fast_sign(app: FastAPI, prefix: str = "/api/v1") -> None:
    """Serve the sign call by `FastSignEndpoint`, ahead of the middleware stack and every route.

    The FastAPI route stays registered so the OpenAPI document still describes the call.
    """
    from api.main import SigngateApp

    if isinstance(app, SigngateApp):
        app.add_fast_route("POST", prefix + "/pki/signers/{signer_id}/sign", FastSignEndpoint())


@router.post("/pki/signers/{signer_id}/verify", response_model=VerifyOut)
def verify(signer_id: str, body: VerifyIn, session: SessionDep, _: MemberOrAdmin) -> VerifyOut:
    valid = store.verify_signature(
        session=session,
        signer_id=signer_id,
        signing_algorithm=body.signing_algorithm,
        data_b64=body.data,
        signature_b64=body.signature,
        is_digest=body.is_digest,
    )
    return VerifyOut(valid=valid)


@router.get("/pki/signers/{signer_id}/operations", response_model=Page[OperationPublic])
def list_operations(
    signer_id: str, session: SessionDep, _: OperationsReader, page: PageDep
) -> Page[OperationPublic]:
    rows, total = store.list_operations(session, signer_id, limit=page.limit, offset=page.offset)
    items = [
        OperationPublic(
            id=op.id,
            at=op.at,
            actor_id=op.actor_id,
            actor_name=name,
            status=op.status,
            signing_algorithm=op.signing_algorithm,
            data_sha256=op.data_sha256,
            grant_id=op.grant_id,
            request_id=op.request_id,
            client_metadata=op.client_metadata,
            ip_address=op.ip_address,
            error=op.error,
        )
        for op, name in rows
    ]
    return Page[OperationPublic](items=items, total=total)
