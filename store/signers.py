"""Signers: a named use of a certificate's key, with members, an optional policy and a status.

Several signers may share one certificate (one key, different policies or teams). The key
cache is keyed by certificate id, so a cached key is dropped only once no active signer
needs it any more; a disabled signer is refused on its database status whatever the cache holds.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from core.errors import BadRequest, Conflict, NotFound
from core.timeutil import as_utc, utcnow
from pki.keys import SoftwareKeyStore
from store import audit
from store.certificates import ACTIVE, AWAITING, full_chain_pem
from store.models import (
    Certificate,
    Grant,
    Identity,
    Signer,
    SignerMember,
    SigningOperation,
    SigningPolicy,
    SigningRequest,
)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
STATUSES = ("active", "disabled")
MAX_MEMBERS = 1000


def get_signer(session: Session, signer_id: str) -> Signer:
    row = session.get(Signer, signer_id)
    if row is None:
        raise NotFound("no such signer")
    return row


def membership(session: Session, *, signer_id: str, identity_id: str) -> bool | None:
    """True or False for an existing signer, None when the signer does not exist (one query)."""
    row = session.execute(
        select(Signer.id, SignerMember.identity_id)  # type: ignore[call-overload]
        .outerjoin(
            SignerMember,
            (SignerMember.signer_id == Signer.id) & (SignerMember.identity_id == identity_id),
        )
        .where(Signer.id == signer_id)
    ).first()
    if row is None:
        return None
    return row[1] is not None


def usable_certificate(session: Session, certificate_id: str, *, now: datetime | None = None) -> Certificate:
    """The certificate a signer may bind to: issued, code-signing, unexpired (else 400)."""
    cert = session.get(Certificate, certificate_id)
    if cert is None:
        raise BadRequest(f"no certificate with id {certificate_id!r}", code="invalid_certificate")
    if cert.status == AWAITING or cert.certificate_pem is None:
        raise BadRequest("the certificate awaits issuance by a CA", code="invalid_certificate")
    if cert.status != ACTIVE:
        raise BadRequest(f"the certificate is {cert.status}", code="invalid_certificate")
    if "codeSigning" not in cert.extended_key_usages:
        raise BadRequest("the certificate lacks the codeSigning EKU", code="invalid_certificate")
    if cert.not_after is not None and as_utc(cert.not_after) <= (now or utcnow()):
        raise BadRequest("the certificate has expired", code="invalid_certificate")
    return cert


def _check_policy(session: Session, signing_policy_id: str | None) -> None:
    if signing_policy_id is not None and session.get(SigningPolicy, signing_policy_id) is None:
        raise BadRequest(f"no signing policy with id {signing_policy_id!r}", code="unknown_signing_policy")


def _check_name(session: Session, name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise BadRequest("name must match [a-z0-9][a-z0-9-]{0,63}", code="invalid_name")
    if session.exec(select(Signer.id).where(Signer.name == name)).first() is not None:  # type: ignore[call-overload]
        raise Conflict(f"a signer named {name!r} exists", code="name_taken")


def create_signer(
    *,
    session: Session,
    name: str,
    description: str | None,
    certificate_id: str,
    signing_policy_id: str | None,
    actor: audit.Actor,
) -> Signer:
    _check_name(session, name)
    cert = usable_certificate(session, certificate_id)
    _check_policy(session, signing_policy_id)
    signer = Signer(
        id=str(uuid.uuid4()),
        name=name,
        description=description,
        certificate_id=cert.id,
        signing_policy_id=signing_policy_id,
        status="active",
    )
    session.add(signer)
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent create won the name
        raise Conflict(f"a signer named {name!r} exists", code="name_taken") from exc
    audit.record(
        session,
        actor=actor,
        action="signer.created",
        entity_type="signer",
        entity_id=signer.id,
        data={"name": name, "certificateId": cert.id, "signingPolicyId": signing_policy_id},
    )
    return signer


def _drop_cached_key_if_unused(session: Session, key_store: SoftwareKeyStore, certificate_id: str) -> None:
    still_used = session.exec(
        select(Signer.id).where(Signer.certificate_id == certificate_id, Signer.status == "active")  # type: ignore[call-overload]
    ).first()
    if still_used is None:
        key_store.evict(certificate_id)


def update_signer(
    *,
    session: Session,
    key_store: SoftwareKeyStore,
    signer_id: str,
    changes: dict[str, Any],
    actor: audit.Actor,
) -> Signer:
    """Apply a PATCH; `changes` holds only the fields the caller sent (snake_case)."""
    signer = get_signer(session, signer_id)
    before = {"description": signer.description, "signingPolicyId": signer.signing_policy_id,
              "status": signer.status, "certificateId": signer.certificate_id}  # fmt: skip
    old_certificate_id = signer.certificate_id
    if "status" in changes:
        if changes["status"] not in STATUSES:
            raise BadRequest("status must be active or disabled", code="invalid_request")
        signer.status = changes["status"]
    if "description" in changes:
        signer.description = changes["description"]
    if "signing_policy_id" in changes:
        _check_policy(session, changes["signing_policy_id"])
        signer.signing_policy_id = changes["signing_policy_id"]
    if "certificate_id" in changes:
        signer.certificate_id = usable_certificate(session, changes["certificate_id"]).id
    after = {"description": signer.description, "signingPolicyId": signer.signing_policy_id,
             "status": signer.status, "certificateId": signer.certificate_id}  # fmt: skip
    changed = {k: v for k, v in after.items() if before[k] != v}
    if not changed:
        return signer
    signer.updated_at = utcnow()
    session.add(signer)
    session.flush()
    if signer.status != "active" or signer.certificate_id != old_certificate_id:
        _drop_cached_key_if_unused(session, key_store, old_certificate_id)
    audit.record(
        session,
        actor=actor,
        action="signer.updated",
        entity_type="signer",
        entity_id=signer.id,
        data={"changes": changed, "before": {k: before[k] for k in changed}},
    )
    return signer


def delete_signer(
    *, session: Session, key_store: SoftwareKeyStore, signer_id: str, actor: audit.Actor
) -> None:
    """Delete a signer nobody has asked to use; one with requests or grants keeps its history (409)."""
    signer = get_signer(session, signer_id)
    in_use = session.execute(
        select(
            exists().where(SigningRequest.signer_id == signer_id)
            | exists().where(Grant.signer_id == signer_id)  # type: ignore[arg-type]
        )
    ).scalar()
    if in_use:
        raise Conflict("the signer has signing requests or grants; disable it instead", code="signer_in_use")
    session.execute(delete(SignerMember).where(SignerMember.signer_id == signer_id))  # type: ignore[arg-type]
    certificate_id, name = signer.certificate_id, signer.name
    session.delete(signer)
    session.flush()
    _drop_cached_key_if_unused(session, key_store, certificate_id)
    audit.record(
        session,
        actor=actor,
        action="signer.deleted",
        entity_type="signer",
        entity_id=signer_id,
        data={"name": name, "certificateId": certificate_id},
    )


def list_signers(
    session: Session, *, member_id: str | None, limit: int, offset: int
) -> tuple[list[Signer], int]:
    """All signers, or only those `member_id` belongs to."""
    query = select(Signer)
    count = select(func.count()).select_from(Signer)
    if member_id is not None:
        mine = select(SignerMember.signer_id).where(SignerMember.identity_id == member_id)  # type: ignore[call-overload]
        query = query.where(Signer.id.in_(mine))  # type: ignore[attr-defined]
        count = count.where(Signer.id.in_(mine))  # type: ignore[attr-defined]
    total = session.exec(count).one()
    rows = session.exec(
        query.order_by(Signer.created_at, Signer.id).offset(offset).limit(limit)  # type: ignore[arg-type]
    ).all()
    return list(rows), int(total)


def key_algorithms(session: Session, certificate_ids: list[str]) -> dict[str, str]:
    if not certificate_ids:
        return {}
    rows = session.execute(
        select(Certificate.id, Certificate.key_algorithm).where(Certificate.id.in_(certificate_ids))  # type: ignore[call-overload, attr-defined]
    ).all()
    return {str(r[0]): str(r[1]) for r in rows}


def list_members(session: Session, signer_id: str) -> list[Identity]:
    get_signer(session, signer_id)
    rows = session.exec(
        select(Identity)
        .join(SignerMember, SignerMember.identity_id == Identity.id)  # type: ignore[arg-type]
        .where(SignerMember.signer_id == signer_id)
        .order_by(Identity.name)
    ).all()
    return list(rows)


def set_members(
    *, session: Session, signer_id: str, identity_ids: list[str], actor: audit.Actor
) -> list[Identity]:
    """Replace the member list; every id must name an identity (else 400, nothing changes)."""
    get_signer(session, signer_id)
    wanted = list(dict.fromkeys(identity_ids))
    if len(wanted) > MAX_MEMBERS:
        raise BadRequest(f"a signer has at most {MAX_MEMBERS} members", code="invalid_request")
    if wanted:
        found = set(
            session.exec(select(Identity.id).where(Identity.id.in_(wanted))).all()  # type: ignore[call-overload, attr-defined]
        )
        unknown = [i for i in wanted if i not in found]
        if unknown:
            raise BadRequest(f"no identity with id {unknown[0]!r}", code="unknown_identity")
    current = set(
        session.exec(select(SignerMember.identity_id).where(SignerMember.signer_id == signer_id)).all()  # type: ignore[call-overload]
    )
    added = [i for i in wanted if i not in current]
    removed = sorted(current - set(wanted))
    if removed:
        session.execute(
            delete(SignerMember).where(
                SignerMember.signer_id == signer_id,  # type: ignore[arg-type]
                SignerMember.identity_id.in_(removed),  # type: ignore[attr-defined]
            )
        )
    for identity_id in added:
        session.add(SignerMember(signer_id=signer_id, identity_id=identity_id))
    session.flush()
    if added or removed:
        audit.record(
            session,
            actor=actor,
            action="signer.members_set",
            entity_type="signer",
            entity_id=signer_id,
            data={"added": added, "removed": removed, "count": len(wanted)},
        )
    return list_members(session, signer_id)


def signer_chain_pem(session: Session, signer_id: str) -> str:
    signer = get_signer(session, signer_id)
    cert = session.get(Certificate, signer.certificate_id)
    if cert is None:  # pragma: no cover - foreign key
        raise NotFound("no such certificate")
    return full_chain_pem(cert)


def verify_signature(
    *,
    session: Session,
    signer_id: str,
    signing_algorithm: str,
    data_b64: str,
    signature_b64: str,
    is_digest: bool,
) -> bool:
    """Check a signature against the signer's certificate; the same input rules as signing."""
    from pki.verification import verify_with_certificate
    from store.signing import decode_sign_data, strict_b64decode

    signer = get_signer(session, signer_id)
    cert = session.get(Certificate, signer.certificate_id)
    if cert is None or cert.certificate_pem is None:  # pragma: no cover - signers need issued certs
        raise Conflict("the signer's certificate has not been issued", code="certificate_not_issued")
    data = decode_sign_data(data_b64, signing_algorithm, cert.key_algorithm, is_digest)
    if len(signature_b64) > 4096:
        raise BadRequest("signature is too long", code="invalid_signature")
    signature = strict_b64decode(signature_b64)
    if signature is None:
        raise BadRequest("signature is not valid base64", code="invalid_signature")
    return verify_with_certificate(
        cert.certificate_pem, signing_algorithm, data, signature, is_digest=is_digest
    )


def list_operations(
    session: Session, signer_id: str, *, limit: int, offset: int
) -> tuple[list[tuple[SigningOperation, str | None]], int]:
    """A signer's signing operations, newest first, each with its actor's current name."""
    get_signer(session, signer_id)
    total = session.exec(
        select(func.count()).select_from(SigningOperation).where(SigningOperation.signer_id == signer_id)
    ).one()
    rows = session.exec(
        select(SigningOperation, Identity.name)  # type: ignore[call-overload]
        .outerjoin(Identity, Identity.id == SigningOperation.actor_id)
        .where(SigningOperation.signer_id == signer_id)
        .order_by(SigningOperation.at.desc(), SigningOperation.id.desc())  # type: ignore[attr-defined]
        .offset(offset)
        .limit(limit)
    ).all()
    return [(op, name) for op, name in rows], int(total)
