"""Opening signing requests: resolve the signer and policy, check the ceilings, build the state."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, select
from sqlmodel import Session

from core.errors import BadRequest, Conflict, Forbidden, NotFound, PolicyViolation
from core.schemas import Artifact, PolicySnapshot, RequestState, SigningRequestInput, StepState
from core.temporal import workflow_id_for
from core.timeutil import as_utc, utcnow
from store.identities import Principal
from store.models import Certificate, PreApproval, Signer, SigningPolicy, SigningRequest
from store.policies import snapshot
from store.signers import membership

DEFAULT_WINDOW_SECONDS = 3600
DEFAULT_OPERATIONS = 1
DIGEST_SIZES = {"SHA256": 32, "SHA384": 48, "SHA512": 64}


def load_request(session: Session, request_id: str) -> SigningRequest:
    row = session.get(SigningRequest, request_id)
    if row is None:
        raise NotFound("no such signing request")
    return row


_STATE_BY_ID = select(SigningRequest.state).where(SigningRequest.id == bindparam("request_id"))  # type: ignore[call-overload]


def read_state(conn: Connection, request_id: str) -> RequestState:
    """The request as last written, read on a connection the caller reads other things with
    (store.db.read_scope)."""
    found = conn.execute(_STATE_BY_ID, {"request_id": request_id}).first()
    if found is None:
        raise NotFound("no such signing request")
    return RequestState.model_validate(found[0])


def state_of(row: SigningRequest) -> RequestState:
    return RequestState.model_validate(row.state)


def resubmission_ids(session: Session, request_id: str) -> list[str]:
    rows = session.execute(
        select(SigningRequest.id)  # type: ignore[call-overload]
        .where(SigningRequest.original_request_id == request_id)
        .order_by(SigningRequest.created_at)
    ).all()
    return [r[0] for r in rows]


def _check_artifact(artifact: Artifact, key_algorithm: str) -> None:
    from pki.algorithms import check_algorithm, hash_name

    check_algorithm(key_algorithm, artifact.signing_algorithm)
    try:
        digest = base64.b64decode(artifact.digest, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("artifact.digest is not valid base64", code="invalid_data") from exc
    if len(digest) != DIGEST_SIZES[artifact.digest_algorithm]:
        raise BadRequest(
            f"a {artifact.digest_algorithm} digest is {DIGEST_SIZES[artifact.digest_algorithm]} bytes",
            code="invalid_digest_length",
        )
    if hash_name(artifact.signing_algorithm) != artifact.digest_algorithm:
        raise BadRequest(
            f"{artifact.signing_algorithm} signs {hash_name(artifact.signing_algorithm)} digests, "
            f"not {artifact.digest_algorithm}",
            code="unsupported_algorithm",
        )


def build_request(
    *,
    session: Session,
    principal: Principal,
    signer_id: str,
    valid_from: datetime | None,
    valid_until: datetime | None,
    allowed_sign_operations: int | None,
    justification: str | None,
    artifact: Artifact | None,
    origin: dict[str, str],
    client_metadata: dict[str, Any],
    ip_address: str | None,
    original_request_id: str | None = None,
    request_id: str | None = None,
) -> SigningRequestInput:
    """Everything the workflow needs, checked against the signer's policy as it stands now."""
    signer = session.get(Signer, signer_id)
    if signer is None:
        raise NotFound("no such signer")
    if not membership(session, signer_id=signer_id, identity_id=principal.identity_id):
        raise Forbidden("the caller is not a member of this signer", code="not_member")
    if signer.status != "active":
        raise Conflict("the signer is disabled", code="signer_unavailable")
    certificate = session.get(Certificate, signer.certificate_id)
    assert certificate is not None
    if certificate.status != "active":
        raise Conflict("the signer's certificate is not active", code="signer_unavailable")
    now = utcnow()
    if certificate.not_after is not None and certificate.not_after <= now:
        raise Conflict("the signer's certificate has expired", code="signer_unavailable")
    policy: PolicySnapshot | None = None
    policy_name: str | None = None
    if signer.signing_policy_id:
        row = session.get(SigningPolicy, signer.signing_policy_id)
        if row is not None:
            policy = snapshot(row)
            policy_name = row.name
    if artifact is not None:
        _check_artifact(artifact, certificate.key_algorithm)

    max_window = policy.max_window_seconds if policy else None
    max_ops = policy.max_signings if policy else None
    window_fixed = valid_from is not None or valid_until is not None
    start = as_utc(valid_from) if valid_from is not None else now
    if valid_until is not None:
        end = as_utc(valid_until)
        if end <= start:
            raise BadRequest("validUntil must be after validFrom", code="invalid_request")
        if end <= now:
            raise BadRequest("validUntil lies in the past", code="invalid_request")
    else:
        end = start + timedelta(seconds=max_window or DEFAULT_WINDOW_SECONDS)
    window_seconds = int((end - start).total_seconds())
    if max_window is not None and window_seconds > max_window:
        raise PolicyViolation(
            f"the window of {window_seconds}s exceeds the policy's maximum of {max_window}s"
        )
    operations = allowed_sign_operations or max_ops or DEFAULT_OPERATIONS
    if max_ops is not None and operations > max_ops:
        raise PolicyViolation(f"{operations} operations exceed the policy's maximum of {max_ops}")

    request_id = request_id or str(uuid.uuid4())
    ttl = policy.request_ttl_seconds if policy else 604800
    steps = (
        [
            StepState(name=s.name, required_approvals=s.required_approvals, approver_ids=list(s.approver_ids))
            for s in policy.steps
        ]
        if policy
        else []
    )
    if steps:
        steps[0].status = "in-progress"
    state = RequestState(
        id=request_id,
        workflow_id=workflow_id_for(request_id),
        signer_id=signer.id,
        signer_name=signer.name,
        certificate_id=certificate.id,
        signing_policy_id=policy.id if policy else None,
        signing_policy_name=policy_name,
        requester_id=principal.identity_id,
        requester_name=principal.name,
        requester_kind=principal.kind,
        justification=justification,
        valid_from=start,
        valid_until=end,
        window_seconds=window_seconds,
        window_fixed=window_fixed,
        allowed_sign_operations=operations,
        artifact=artifact,
        origin=origin,
        client_metadata=client_metadata,
        ip_address=ip_address,
        steps=steps,
        current_step=0 if steps else None,
        original_request_id=original_request_id,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl),
    )
    return SigningRequestInput(
        request=state,
        policy=policy,
        pre_approval_possible=pre_approval_in_sight(session, signer.id, principal.identity_id, now)
        is not None,
    )


def pre_approval_in_sight(
    session: Session, signer_id: str, identity_id: str, now: datetime | None = None
) -> tuple[str, datetime] | None:
    """A pre-approval that could serve a request of this identity on this signer, now or once
    it starts (the soonest to start): one indexed look-up; the workflow's claim does the exact
    match (address, executable)."""
    found = session.execute(
        select(PreApproval.id, PreApproval.not_before)  # type: ignore[call-overload]
        .where(
            PreApproval.signer_id == signer_id,
            PreApproval.identity_id == identity_id,
            PreApproval.status == "active",
            PreApproval.expires_at > (now or utcnow()),
        )
        .order_by(PreApproval.not_before)
        .limit(1)
    ).first()
    return (str(found[0]), as_utc(found[1])) if found is not None else None
