"""The sign path: resolve the signer, consume one grant operation atomically, sign, record.

Grant consumption is one conditional UPDATE ... RETURNING, in the same transaction as the
signing-operation row and its audit event, so concurrent callers (threads, API processes)
can never overspend a grant and no signature exists without its record. A failed signature
rolls the consumption back.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, select, update
from sqlmodel import Session

from core.errors import ApprovalRequired, BadRequest, Conflict, NotFound
from core.timeutil import utcnow
from store import audit
from store.db import session_scope
from store.models import Certificate, Grant, Signer, SigningOperation, SigningRequest

log = logging.getLogger(__name__)

MAX_DATA_BYTES = 128


@dataclass(frozen=True)
class SignerKey:
    signer_id: str
    signer_name: str
    status: str
    signing_policy_id: str | None
    certificate_id: str
    certificate_status: str
    key_algorithm: str
    sealed_key: bytes
    not_before: datetime | None
    not_after: datetime | None


@dataclass(frozen=True)
class SignResult:
    signature: bytes
    signing_algorithm: str
    signer_id: str
    grant_id: str | None
    operation_id: str


def load_signer_key(session: Session, signer_id: str) -> SignerKey:
    row = session.execute(
        select(
            Signer.id,  # type: ignore[call-overload]
            Signer.name,
            Signer.status,
            Signer.signing_policy_id,
            Certificate.id,
            Certificate.status,
            Certificate.key_algorithm,
            Certificate.sealed_key,
            Certificate.not_before,
            Certificate.not_after,
        )
        .join(Certificate, Certificate.id == Signer.certificate_id)
        .where(Signer.id == signer_id)
    ).first()
    if row is None:
        raise NotFound("no such signer")
    return SignerKey(*row)


def decode_sign_data(data_b64: str, signing_algorithm: str, key_algorithm: str, is_digest: bool) -> bytes:
    """Check the input before anything is recorded: bad input changes nothing."""
    from pki.algorithms import check_algorithm, digest_size

    check_algorithm(key_algorithm, signing_algorithm)
    try:
        data = base64.b64decode(data_b64, validate=True)
    except ValueError as exc:
        raise BadRequest("data is not valid base64", code="invalid_data") from exc
    if len(data) > MAX_DATA_BYTES:
        raise BadRequest(f"data must be at most {MAX_DATA_BYTES} bytes", code="data_too_large")
    if is_digest and len(data) != digest_size(signing_algorithm):
        raise BadRequest(
            f"a {signing_algorithm} digest is {digest_size(signing_algorithm)} bytes, got {len(data)}",
            code="invalid_digest_length",
        )
    if not data and not is_digest:
        raise BadRequest("data must not be empty", code="invalid_data")
    return data


def signer_refusal(key: SignerKey, now: datetime) -> str | None:
    if key.status != "active":
        return "the signer is disabled"
    if key.certificate_status != "active":
        return "the signer's certificate is not active"
    if key.not_before is not None and now < key.not_before:
        return "the signer's certificate is not yet valid"
    if key.not_after is not None and now >= key.not_after:
        return "the signer's certificate has expired"
    return None


def consume_grant(
    session: Session, *, signer_id: str, identity_id: str, now: datetime, grant_id: str | None = None
) -> tuple[str, str] | None:
    """Take one operation from an active grant inside its window; (grant id, request id) or None."""
    for _ in range(5):
        if grant_id is None:
            candidate = session.execute(
                select(Grant.id)  # type: ignore[call-overload]
                .where(
                    Grant.signer_id == signer_id,
                    Grant.identity_id == identity_id,
                    Grant.status == "active",
                    Grant.valid_from <= now,
                    Grant.valid_until > now,
                    Grant.used_sign_operations < Grant.allowed_sign_operations,
                )
                .order_by(Grant.valid_until, Grant.id)
                .limit(1)
            ).scalar()
            if candidate is None:
                return None
        else:
            candidate = grant_id
        result = session.execute(
            update(Grant)
            .where(
                and_(
                    Grant.id == candidate,  # type: ignore[arg-type]
                    Grant.identity_id == identity_id,  # type: ignore[arg-type]
                    Grant.signer_id == signer_id,  # type: ignore[arg-type]
                    Grant.status == "active",  # type: ignore[arg-type]
                    Grant.valid_from <= now,  # type: ignore[arg-type]
                    Grant.valid_until > now,  # type: ignore[arg-type]
                    Grant.used_sign_operations < Grant.allowed_sign_operations,  # type: ignore[arg-type]
                )
            )
            .values(
                used_sign_operations=Grant.used_sign_operations + 1,
                status=_exhausted_case(),
            )
            .returning(Grant.id, Grant.request_id)  # type: ignore[arg-type]
        ).first()
        if result is not None:
            return str(result[0]), str(result[1])
        if grant_id is not None:
            return None
    return None


def _exhausted_case() -> Any:
    from sqlalchemy import case

    return case(
        (Grant.used_sign_operations + 1 >= Grant.allowed_sign_operations, "exhausted"),  # type: ignore[operator]
        else_=Grant.status,
    )


def _record_operation(
    session: Session,
    *,
    operation_id: str,
    key: SignerKey,
    actor: audit.Actor,
    status: str,
    signing_algorithm: str,
    data: bytes,
    grant_id: str | None,
    request_id: str | None,
    client_metadata: dict[str, Any] | None,
    error: str | None,
    now: datetime,
) -> None:
    data_sha256 = hashlib.sha256(data).hexdigest()
    session.add(
        SigningOperation(
            id=operation_id,
            at=now,
            signer_id=key.signer_id,
            actor_id=actor.id or "system",
            status=status,
            signing_algorithm=signing_algorithm,
            data_sha256=data_sha256,
            grant_id=grant_id,
            request_id=request_id,
            client_metadata=client_metadata,
            ip_address=actor.ip_address,
            error=error,
        )
    )
    audit.record(
        session,
        actor=actor,
        action=f"signing_operation.{status}",
        entity_type="signing_operation",
        entity_id=operation_id,
        request_id=request_id,
        data={
            "signerId": key.signer_id,
            "signerName": key.signer_name,
            "grantId": grant_id,
            "signingAlgorithm": signing_algorithm,
            "dataSha256": data_sha256,
            "error": error,
        },
    )


def record_denied(
    engine: Engine,
    *,
    key: SignerKey,
    actor: audit.Actor,
    signing_algorithm: str,
    data: bytes,
    client_metadata: dict[str, Any] | None,
    error: str,
) -> str:
    operation_id = str(uuid.uuid4())
    with session_scope(engine) as session:
        _record_operation(
            session,
            operation_id=operation_id,
            key=key,
            actor=actor,
            status="denied",
            signing_algorithm=signing_algorithm,
            data=data,
            grant_id=None,
            request_id=None,
            client_metadata=client_metadata,
            error=error,
            now=utcnow(),
        )
    return operation_id


def sign(
    engine: Engine,
    key_store: Any,
    *,
    signer_id: str,
    actor: audit.Actor,
    signing_algorithm: str,
    data_b64: str,
    is_digest: bool,
    client_metadata: dict[str, Any] | None,
    grant_id: str | None = None,
    require_grant: bool | None = None,
    store_signature_on_request: str | None = None,
    producer: Callable[[Any], bytes] | None = None,
) -> SignResult:
    """Sign for `actor` under the signer's rules, recording the attempt whatever its outcome."""
    from pki.errors import PkiError
    from pki.signing import sign as pki_sign

    with session_scope(engine) as session:
        key = load_signer_key(session, signer_id)
    data = decode_sign_data(data_b64, signing_algorithm, key.key_algorithm, is_digest)
    now = utcnow()
    refusal = signer_refusal(key, now)
    if refusal is not None:
        record_denied(
            engine, key=key, actor=actor, signing_algorithm=signing_algorithm, data=data,
            client_metadata=client_metadata, error=refusal,
        )
        raise Conflict(refusal, code="signer_unavailable")
    needs_grant = key.signing_policy_id is not None if require_grant is None else require_grant
    operation_id = str(uuid.uuid4())
    failure: str | None = None
    with session_scope(engine) as session:
        consumed: tuple[str, str] | None = None
        if needs_grant:
            consumed = consume_grant(
                session, signer_id=signer_id, identity_id=actor.id or "", now=now, grant_id=grant_id
            )
        if needs_grant and consumed is None:
            _record_operation(
                session, operation_id=operation_id, key=key, actor=actor, status="denied",
                signing_algorithm=signing_algorithm, data=data, grant_id=grant_id, request_id=None,
                client_metadata=client_metadata, error="no active grant with operations left", now=now,
            )
        else:
            try:
                private_key = key_store.load_cached(key.certificate_id, key.sealed_key)
                if producer is not None:
                    signature = producer(private_key)
                else:
                    signature = pki_sign(private_key, signing_algorithm, data, is_digest=is_digest)
            except PkiError as exc:
                log.warning("signing failed for signer %s: %s", key.signer_name, exc.code)
                failure = "the signature could not be produced"
                session.rollback()
            else:
                _record_operation(
                    session, operation_id=operation_id, key=key, actor=actor, status="success",
                    signing_algorithm=signing_algorithm, data=data,
                    grant_id=consumed[0] if consumed else None,
                    request_id=consumed[1] if consumed else None,
                    client_metadata=client_metadata, error=None, now=now,
                )
                if store_signature_on_request is not None:
                    session.execute(
                        update(SigningRequest)
                        .where(SigningRequest.id == store_signature_on_request)  # type: ignore[arg-type]
                        .values(signature=base64.b64encode(signature).decode())
                    )
                return SignResult(
                    signature=signature,
                    signing_algorithm=signing_algorithm,
                    signer_id=signer_id,
                    grant_id=consumed[0] if consumed else None,
                    operation_id=operation_id,
                )
    if failure is not None:
        with session_scope(engine) as session:
            _record_operation(
                session, operation_id=operation_id, key=key, actor=actor, status="failed",
                signing_algorithm=signing_algorithm, data=data, grant_id=None, request_id=None,
                client_metadata=client_metadata, error=failure, now=now,
            )
        from core.errors import SigngateError

        err = SigngateError(failure, code="signing_failed")
        err.status_code = 500
        raise err
    raise ApprovalRequired("an approved grant for this signer is required; open a signing request")
