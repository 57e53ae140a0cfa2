"""Certificates and their server-held keys (admin). No answer ever carries key material."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Response
from pydantic import Field

from api.deps import ActorDep, AdminPrincipal, ContextDep, PageDep, SessionDep
from api.schemas import ApiModel, Page
from store import certificates as store
from store.models import Certificate

router = APIRouter(tags=["certificates"])

PEM_MEDIA_TYPE = "application/x-pem-file"


class SubjectIn(ApiModel):
    common_name: str = Field(min_length=1, max_length=64)
    organization: str | None = Field(default=None, max_length=64)
    organizational_unit: str | None = Field(default=None, max_length=64)
    country: str | None = Field(default=None, max_length=2)


class CertificateCreate(ApiModel):
    name: str = Field(min_length=1, max_length=200)
    key_algorithm: str = Field(max_length=32)
    subject: SubjectIn
    mode: Literal["self-signed", "csr"]
    validity_days: int | None = Field(default=None, ge=1, le=3650)


class CertificateInstall(ApiModel):
    certificate_pem: str = Field(min_length=1, max_length=64 * 1024)
    chain_pem: str | None = Field(default=None, max_length=512 * 1024)


class CertificateImport(ApiModel):
    name: str = Field(min_length=1, max_length=200)
    pkcs12: str = Field(min_length=1)
    password: str | None = Field(default=None, max_length=1024)


class CertificatePublic(ApiModel):
    id: str
    name: str
    status: str
    key_algorithm: str
    certificate_pem: str | None
    csr_pem: str | None
    serial_number: str | None
    not_before: datetime | None
    not_after: datetime | None
    extended_key_usages: list[str]
    fingerprint_sha256: str | None
    warnings: list[str]


def public(row: Certificate) -> CertificatePublic:
    return CertificatePublic(**store.certificate_fields(row))


@router.post("/pki/certificates", status_code=201, response_model=CertificatePublic)
def create_certificate(
    body: CertificateCreate, session: SessionDep, ctx: ContextDep, _: AdminPrincipal, actor: ActorDep
) -> CertificatePublic:
    subject = store.build_subject(
        common_name=body.subject.common_name,
        organization=body.subject.organization,
        organizational_unit=body.subject.organizational_unit,
        country=body.subject.country,
    )
    row = store.create_certificate(
        session=session,
        key_store=ctx.key_store,
        master_key_id=ctx.settings.master_key_id,
        name=body.name,
        key_algorithm=body.key_algorithm,
        subject=subject,
        mode=body.mode,
        validity_days=body.validity_days or ctx.settings.default_validity_days,
        actor=actor,
    )
    return public(row)


@router.post("/pki/certificates/import", status_code=201, response_model=CertificatePublic)
def import_certificate(
    body: CertificateImport, session: SessionDep, ctx: ContextDep, _: AdminPrincipal, actor: ActorDep
) -> CertificatePublic:
    row = store.import_certificate(
        session=session,
        key_store=ctx.key_store,
        master_key_id=ctx.settings.master_key_id,
        name=body.name,
        pkcs12_b64=body.pkcs12,
        password=body.password,
        actor=actor,
    )
    return public(row)


@router.post("/pki/certificates/{certificate_id}/certificate", response_model=CertificatePublic)
def install_certificate(
    certificate_id: str,
    body: CertificateInstall,
    session: SessionDep,
    ctx: ContextDep,
    _: AdminPrincipal,
    actor: ActorDep,
) -> CertificatePublic:
    row = store.install_certificate(
        session=session,
        key_store=ctx.key_store,
        certificate_id=certificate_id,
        certificate_pem=body.certificate_pem,
        chain_pem=body.chain_pem,
        actor=actor,
    )
    return public(row)


@router.get("/pki/certificates", response_model=Page[CertificatePublic])
def list_certificates(session: SessionDep, _: AdminPrincipal, page: PageDep) -> Page[CertificatePublic]:
    rows, total = store.list_certificates(session, limit=page.limit, offset=page.offset)
    return Page[CertificatePublic](items=[public(r) for r in rows], total=total)


@router.get("/pki/certificates/{certificate_id}", response_model=CertificatePublic)
def get_certificate(certificate_id: str, session: SessionDep, _: AdminPrincipal) -> CertificatePublic:
    return public(store.get_certificate(session, certificate_id))


@router.get(
    "/pki/certificates/{certificate_id}/chain",
    response_class=Response,
    responses={200: {"content": {PEM_MEDIA_TYPE: {}}}},
)
def get_chain(certificate_id: str, session: SessionDep, _: AdminPrincipal) -> Response:
    pem = store.full_chain_pem(store.get_certificate(session, certificate_id))
    return Response(content=pem, media_type=PEM_MEDIA_TYPE)
