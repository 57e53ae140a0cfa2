"""The sign path: resolve the signer, consume one grant operation atomically, sign, record.

One transaction carries the whole attempt: the signer lookup, the grant consumption (a
conditional UPDATE ... RETURNING, so concurrent callers in threads or other API processes
can never overspend a grant), the signature and the signing-operation row with its audit
event. No signature therefore leaves the server without its record, and a failed signature
rolls the consumption back before the failure itself is recorded.

Input is checked before anything is written: a malformed request changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Engine, and_, case, select, update
from sqlmodel import Session

from core.errors import ApprovalRequired, BadRequest, Conflict, NotFound, SigngateError
from core.metrics import SIGN_OPERATIONS
from core.timeutil import as_utc, utcnow
from store import audit
from store.db import session_scope
from store.models import Certificate, Grant, Signer, SigningOperation, SigningRequest

log = logging.getLogger(__name__)

MAX_DATA_BYTES = 128
# Base64 of MAX_DATA_BYTES is 172 characters; anything far longer is refused before decoding.
_MAX_DATA_TEXT = 1024


class SigningFailed(SigngateError):
    """The server could not produce a signature (key store, library): not the caller's fault."""

    status_code = 500
    code = "signing_failed"


class CachingKeyStore(Protocol):
    def load_cached(self, cache_key: str, key_ref: bytes) -> Any: ...


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


def strict_b64decode(text: str) -> bytes | None:
    """Standard base64 in its one canonical form, or None.

    Python's decoder also takes surplus padding and non-zero trailing bits, so two different
    strings could stand for the same bytes; only the canonical encoding is accepted.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw


def decode_data(data_b64: str) -> bytes:
    """Decode the caller's base64 data, refusing oversized input before decoding it."""
    if len(data_b64) > _MAX_DATA_TEXT:
        raise BadRequest(f"data must be at most {MAX_DATA_BYTES} bytes", code="data_too_large")
    data = strict_b64decode(data_b64)
    if data is None:
        raise BadRequest("data is not valid base64", code="invalid_data")
    if len(data) > MAX_DATA_BYTES:
        raise BadRequest(f"data must be at most {MAX_DATA_BYTES} bytes", code="data_too_large")
    return data


def decode_sign_data(data_b64: str, signing_algorithm: str, key_algorithm: str, is_digest: bool) -> bytes:
    """Check the input before anything is recorded: bad input changes nothing."""
    from pki.algorithms import check_algorithm, digest_size

    check_algorithm(key_algorithm, signing_algorithm)
    data = decode_data(data_b64)
    if is_digest and len(data) != digest_size(signing_algorithm):
        raise BadRequest(
            f"a {signing_algorithm} digest is {digest_size(signing_algorithm)} bytes, got {len(data)}",
            code="invalid_digest_length",
        )
    if not data and not is_digest:
        raise BadRequest("data must not be empty", code="invalid_data")
    return data


def signer_refusal(key: SignerKey, now: datetime) -> Conflict | None:
    """Why the signer cannot sign right now (409), or None; checked on every call, never cached."""
    if key.status != "active":
        return Conflict("the signer is disabled", code="signer_disabled")
    if key.certificate_status != "active":
        return Conflict("the signer's certificate is not active", code="certificate_not_active")
    if key.not_before is not None and now < as_utc(key.not_before):
        return Conflict("the signer's certificate is not yet valid", code="certificate_not_yet_valid")
    if key.not_after is not None and now >= as_utc(key.not_after):
        return Conflict("the signer's certificate has expired", code="certificate_expired")
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
                status=case(
                    (Grant.used_sign_operations + 1 >= Grant.allowed_sign_operations, "exhausted"),  # type: ignore[operator]
                    else_=Grant.status,
                ),
            )
            .returning(Grant.id, Grant.request_id)  # type: ignore[arg-type]
        ).first()
        if result is not None:
            return str(result[0]), str(result[1])
        if grant_id is not None:
            return None
    return None


@dataclass(frozen=True)
class _Attempt:
    """What one call is about, so each outcome records the same facts."""

    operation_id: str
    key: SignerKey
    actor: audit.Actor
    signing_algorithm: str
    data_sha256: str
    client_metadata: dict[str, Any] | None
    now: datetime


def _record_operation(
    session: Session,
    attempt: _Attempt,
    *,
    status: str,
    grant_id: str | None,
    request_id: str | None,
    error: str | None,
) -> None:
    key = attempt.key
    SIGN_OPERATIONS.labels(status=status).inc()
    session.add(
        SigningOperation(
            id=attempt.operation_id,
            at=attempt.now,
            signer_id=key.signer_id,
            actor_id=attempt.actor.id or "system",
            status=status,
            signing_algorithm=attempt.signing_algorithm,
            data_sha256=attempt.data_sha256,
            grant_id=grant_id,
            request_id=request_id,
            client_metadata=attempt.client_metadata,
            ip_address=attempt.actor.ip_address,
            error=error,
        )
    )
    audit.record(
        session,
        actor=attempt.actor,
        action=f"signing_operation.{status}",
        entity_type="signing_operation",
        entity_id=attempt.operation_id,
        request_id=request_id,
        data={
            "signerId": key.signer_id,
            "signerName": key.signer_name,
            "grantId": grant_id,
            "signingAlgorithm": attempt.signing_algorithm,
            "dataSha256": attempt.data_sha256,
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
    """Record a refusal decided outside `sign` (its own transaction); returns the operation id."""
    attempt = _Attempt(
        operation_id=str(uuid.uuid4()),
        key=key,
        actor=actor,
        signing_algorithm=signing_algorithm,
        data_sha256=hashlib.sha256(data).hexdigest(),
        client_metadata=client_metadata,
        now=utcnow(),
    )
    with session_scope(engine) as session:
        _record_operation(session, attempt, status="denied", grant_id=None, request_id=None, error=error)
    return attempt.operation_id


def sign(
    engine: Engine,
    key_store: CachingKeyStore,
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
    """Sign for `actor` under the signer's rules, recording the attempt whatever its outcome.

    The caller has already checked who may use the signer (membership, scope). `producer`
    replaces the raw signature (CMS for artifacts); `require_grant` forces or waives the grant
    regardless of the signer's policy; `grant_id` pins the grant to consume.
    """
    from pki.errors import KeyDecryptionError, PkiError, SigningError
    from pki.signing import sign as pki_sign

    now = utcnow()
    refusal: SigngateError | None = None
    with session_scope(engine) as session:
        key = load_signer_key(session, signer_id)
        data = decode_sign_data(data_b64, signing_algorithm, key.key_algorithm, is_digest)
        attempt = _Attempt(
            operation_id=str(uuid.uuid4()),
            key=key,
            actor=actor,
            signing_algorithm=signing_algorithm,
            data_sha256=hashlib.sha256(data).hexdigest(),
            client_metadata=client_metadata,
            now=now,
        )
        refusal = signer_refusal(key, now)
        needs_grant = key.signing_policy_id is not None if require_grant is None else require_grant
        consumed: tuple[str, str] | None = None
        if refusal is None and needs_grant:
            consumed = consume_grant(
                session, signer_id=signer_id, identity_id=actor.id or "", now=now, grant_id=grant_id
            )
            if consumed is None:
                refusal = ApprovalRequired(
                    "an approved grant for this signer is required; open a signing request"
                )
        if refusal is not None:
            _record_operation(
                session, attempt, status="denied", grant_id=grant_id, request_id=None,
                error=refusal.description,
            )  # fmt: skip
        else:
            try:
                private_key = key_store.load_cached(key.certificate_id, key.sealed_key)
                if producer is not None:
                    signature = producer(private_key)
                else:
                    signature = pki_sign(private_key, signing_algorithm, data, is_digest=is_digest)
            except (SigningError, KeyDecryptionError) as exc:
                log.warning("signing failed for signer %s: %s", key.signer_name, exc.code)
                refusal = SigningFailed("the signature could not be produced")
            except PkiError as exc:
                # A request the producer (CMS) cannot serve: the caller's error, not the server's.
                refusal = BadRequest(exc.message, code=exc.code)
            except Exception:
                log.exception("signing failed for signer %s", key.signer_name)
                refusal = SigningFailed("the signature could not be produced")
            if refusal is not None:
                # Give back the grant operation, then record the failure on its own.
                session.rollback()
                _record_operation(
                    session, attempt, status="failed", grant_id=None, request_id=None,
                    error=refusal.description,
                )  # fmt: skip
            else:
                grant, request = consumed if consumed is not None else (None, None)
                _record_operation(
                    session, attempt, status="success", grant_id=grant, request_id=request, error=None
                )
                if store_signature_on_request is not None:
                    session.execute(
                        update(SigningRequest)
                        .where(SigningRequest.id == store_signature_on_request)  # type: ignore[arg-type]
                        .values(signature=base64.b64encode(signature).decode())
                    )
                result = SignResult(
                    signature=signature,
                    signing_algorithm=signing_algorithm,
                    signer_id=signer_id,
                    grant_id=grant,
                    operation_id=attempt.operation_id,
                )
    # Raised only now, after the commit, so the record of a refused attempt is kept.
    if refusal is not None:
        raise refusal
    return result
