"""Certificates and their sealed keys: self-signed, CSR then CA-issued, or imported from PKCS#12.

A key is generated (or imported) here, sealed at once by the key store, and only the sealed
reference reaches the database. Key generation happens before the session is first used, so
a slow RSA-4096 generation never holds a database lock.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC
from typing import Any, Literal

from sqlalchemy import func
from sqlmodel import Session, select

from core.errors import BadRequest, Conflict, NotFound
from core.timeutil import utcnow
from pki.certificates import CertificateInfo, Subject
from pki.keys import PrivateKey, SoftwareKeyStore
from store import audit
from store.models import Certificate

ACTIVE = "active"
AWAITING = "awaiting-certificate"
MAX_PKCS12_BYTES = 256 * 1024

IMPORTED_KEY_WARNING = (
    "the private key was imported: copies of it may exist outside this server, "
    "so signgate cannot vouch for who else can sign with it"
)


def _apply_certificate(row: Certificate, info: CertificateInfo) -> None:
    row.certificate_pem = info.certificate_pem
    row.serial_number = info.serial_number
    row.not_before = info.not_before.replace(tzinfo=UTC)
    row.not_after = info.not_after.replace(tzinfo=UTC)
    row.extended_key_usages = list(info.extended_key_usages)
    row.fingerprint_sha256 = info.fingerprint_sha256


def _usability_warnings(info: CertificateInfo) -> list[str]:
    warnings = []
    if "codeSigning" not in info.extended_key_usages:
        warnings.append("the certificate lacks the codeSigning EKU: no signer can use it")
    if info.not_after.replace(tzinfo=UTC) <= utcnow():
        warnings.append("the certificate has expired: no signer can use it")
    return warnings


def build_subject(
    *,
    common_name: str,
    organization: str | None,
    organizational_unit: str | None,
    country: str | None,
) -> Subject:
    from pki.errors import InvalidData

    try:
        return Subject(
            common_name=common_name,
            organization=organization,
            organizational_unit=organizational_unit,
            country=country,
        )
    except InvalidData as exc:
        raise BadRequest(exc.message, code="invalid_subject") from exc


def get_certificate(session: Session, certificate_id: str) -> Certificate:
    row = session.get(Certificate, certificate_id)
    if row is None:
        raise NotFound("no such certificate")
    return row


def list_certificates(session: Session, *, limit: int, offset: int) -> tuple[list[Certificate], int]:
    total = session.exec(select(func.count()).select_from(Certificate)).one()
    rows = session.exec(
        select(Certificate)
        .order_by(Certificate.created_at, Certificate.id)  # type: ignore[arg-type]
        .offset(offset)
        .limit(limit)
    ).all()
    return list(rows), int(total)


def create_certificate(
    *,
    session: Session,
    key_store: SoftwareKeyStore,
    master_key_id: str,
    name: str,
    key_algorithm: str,
    subject: Subject,
    mode: Literal["self-signed", "csr"],
    validity_days: int,
    actor: audit.Actor,
) -> Certificate:
    """Generate and seal a key, then self-sign it or produce a CSR for a CA."""
    from pki.algorithms import check_key_algorithm
    from pki.certificates import create_csr, create_self_signed, csr_pem, describe
    from pki.keys import generate_private_key

    algorithm = check_key_algorithm(key_algorithm)
    private_key = generate_private_key(algorithm)
    row = Certificate(
        id=str(uuid.uuid4()),
        name=name,
        status=AWAITING,
        key_algorithm=algorithm,
        sealed_key=key_store.store(private_key),
        master_key_id=master_key_id,
    )
    if mode == "self-signed":
        _apply_certificate(row, describe(create_self_signed(private_key, subject, validity_days)))
        row.status = ACTIVE
    else:
        row.csr_pem = csr_pem(create_csr(private_key, subject))
    del private_key
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="certificate.created",
        entity_type="certificate",
        entity_id=row.id,
        data={
            "name": name,
            "keyAlgorithm": algorithm,
            "mode": mode,
            "status": row.status,
            "serialNumber": row.serial_number,
            "fingerprintSha256": row.fingerprint_sha256,
        },
    )
    return row


def install_certificate(
    *,
    session: Session,
    key_store: SoftwareKeyStore,
    certificate_id: str,
    certificate_pem: str,
    chain_pem: str | None,
    actor: audit.Actor,
) -> Certificate:
    """Accept the CA's answer to our CSR once it is for our key, code-signing and unexpired."""
    from pki.certificates import (
        certificate_pem as to_pem,
    )
    from pki.certificates import (
        check_issued_certificate,
        describe,
        parse_certificate_pem,
        parse_chain_pem,
    )

    row = get_certificate(session, certificate_id)
    if row.status != AWAITING:
        raise Conflict("the certificate is not awaiting issuance", code="certificate_not_awaiting")
    cert = parse_certificate_pem(certificate_pem)
    chain = parse_chain_pem(chain_pem) if chain_pem and chain_pem.strip() else []
    private_key: PrivateKey = key_store.load(row.sealed_key)
    check_issued_certificate(cert, private_key)
    del private_key
    _apply_certificate(row, describe(cert))
    row.chain_pem = "".join(to_pem(c) for c in chain if c != cert) or None
    row.status = ACTIVE
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    key_store.evict(row.id)
    audit.record(
        session,
        actor=actor,
        action="certificate.issued",
        entity_type="certificate",
        entity_id=row.id,
        data={
            "serialNumber": row.serial_number,
            "fingerprintSha256": row.fingerprint_sha256,
            "notAfter": row.not_after,
            "chainLength": len(chain),
        },
    )
    return row


def import_certificate(
    *,
    session: Session,
    key_store: SoftwareKeyStore,
    master_key_id: str,
    name: str,
    pkcs12_b64: str,
    password: str | None,
    actor: audit.Actor,
) -> Certificate:
    """Import key and certificate from a PKCS#12 bundle, with a warning that the key is not ours alone."""
    from pki.certificates import certificate_pem as to_pem
    from pki.certificates import describe, import_pkcs12
    from pki.keys import key_algorithm_of

    if len(pkcs12_b64) > MAX_PKCS12_BYTES * 4 // 3 + 4:
        raise BadRequest(f"pkcs12 must be at most {MAX_PKCS12_BYTES} bytes", code="invalid_pkcs12")
    try:
        # Tools such as `base64` wrap their output at 76 columns: line breaks are not errors here.
        bundle = base64.b64decode("".join(pkcs12_b64.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("pkcs12 is not valid base64", code="invalid_pkcs12") from exc
    private_key, cert, chain = import_pkcs12(bundle, password)
    info = describe(cert)
    row = Certificate(
        id=str(uuid.uuid4()),
        name=name,
        status=ACTIVE,
        key_algorithm=key_algorithm_of(private_key),
        sealed_key=key_store.store(private_key),
        master_key_id=master_key_id,
        warnings=[IMPORTED_KEY_WARNING, *_usability_warnings(info)],
    )
    del private_key
    _apply_certificate(row, info)
    row.chain_pem = "".join(to_pem(c) for c in chain if c != cert) or None
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="certificate.imported",
        entity_type="certificate",
        entity_id=row.id,
        data={
            "name": name,
            "keyAlgorithm": row.key_algorithm,
            "serialNumber": row.serial_number,
            "fingerprintSha256": row.fingerprint_sha256,
            "chainLength": len(chain),
        },
    )
    return row


def full_chain_pem(row: Certificate) -> str:
    """Leaf first, then the CA chain, as verifiers and `openssl verify -untrusted` expect it."""
    if row.status == AWAITING or row.certificate_pem is None:
        raise Conflict("the certificate has not been issued yet", code="certificate_not_issued")
    return row.certificate_pem + (row.chain_pem or "")


def certificate_fields(row: Certificate) -> dict[str, Any]:
    """The public view of a row: everything but the sealed key."""
    return {
        "id": row.id,
        "name": row.name,
        "status": row.status,
        "key_algorithm": row.key_algorithm,
        "certificate_pem": row.certificate_pem,
        "csr_pem": row.csr_pem,
        "serial_number": row.serial_number,
        "not_before": row.not_before,
        "not_after": row.not_after,
        "extended_key_usages": list(row.extended_key_usages),
        "fingerprint_sha256": row.fingerprint_sha256,
        "warnings": list(row.warnings),
    }
