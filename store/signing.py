"""The sign path's rules: the caller's input, the signer's state, and `sign` for one call.

Deciding, signing and recording happen in `store.fastsign`, which the API calls in batches
and `sign` calls for one attempt: the signer lookup, the grant consumption (a conditional
UPDATE ... RETURNING, so concurrent callers in threads or other processes can never
overspend a grant), the signature and the signing-operation row with its audit event, all
committed before an answer. No signature leaves the server without its record, and a failed
signature consumes nothing.

Input is checked before anything is written: a malformed request changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Engine, select
from sqlmodel import Session

from core.errors import BadRequest, Conflict, NotFound, SigngateError
from core.timeutil import as_utc
from store import audit
from store.models import Certificate, Signer

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
    from pki.errors import PkiError

    try:
        check_algorithm(key_algorithm, signing_algorithm)
        data = decode_data(data_b64)
    except PkiError as exc:
        raise BadRequest(exc.message, code=exc.code) from exc
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
    regardless of the signer's policy; `grant_id` pins the grant to consume. The API's sign
    calls take the same path in batches (`store.fastsign`).
    """
    from store.fastsign import SignCall, sign_once

    call = SignCall(
        signer_id=signer_id,
        signing_algorithm=signing_algorithm,
        data_b64=data_b64,
        is_digest=is_digest,
        client_metadata=client_metadata,
        actor=actor,
        grant_id=grant_id,
        require_grant=require_grant,
        store_signature_on_request=store_signature_on_request,
        producer=producer,
    )
    return sign_once(engine, key_store, call)
