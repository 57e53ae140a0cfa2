"""SQLModel tables. Never passed to workflows: workflows see plain models from core.schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, LargeBinary, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from core.timeutil import utcnow


class Identity(SQLModel, table=True):
    __tablename__ = "identities"
    id: str = Field(primary_key=True, max_length=36)
    name: str = Field(index=True, unique=True, max_length=128)
    kind: str = Field(max_length=16)
    email: str | None = Field(default=None, max_length=320)
    created_at: datetime = Field(default_factory=utcnow)


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_tokens"
    id: str = Field(primary_key=True, max_length=36)
    identity_id: str = Field(foreign_key="identities.id", index=True, max_length=36)
    token_hash: str = Field(unique=True, max_length=64)
    scopes: list[str] = Field(sa_column=Column(JSON, nullable=False))
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Certificate(SQLModel, table=True):
    __tablename__ = "certificates"
    id: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=200)
    status: str = Field(max_length=32)
    key_algorithm: str = Field(max_length=16)
    sealed_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    master_key_id: str = Field(max_length=64)
    certificate_pem: str | None = Field(default=None, sa_column=Column(Text))
    chain_pem: str | None = Field(default=None, sa_column=Column(Text))
    csr_pem: str | None = Field(default=None, sa_column=Column(Text))
    serial_number: str | None = Field(default=None, max_length=80)
    not_before: datetime | None = None
    not_after: datetime | None = None
    extended_key_usages: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    fingerprint_sha256: str | None = Field(default=None, max_length=64)
    warnings: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class SigningPolicy(SQLModel, table=True):
    __tablename__ = "signing_policies"
    id: str = Field(primary_key=True, max_length=36)
    name: str = Field(unique=True, max_length=128)
    steps: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    max_window_seconds: int | None = None
    max_signings: int | None = None
    request_ttl_seconds: int = 604800
    allow_machine_bypass: bool = False
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Signer(SQLModel, table=True):
    __tablename__ = "signers"
    id: str = Field(primary_key=True, max_length=36)
    name: str = Field(unique=True, max_length=64)
    description: str | None = Field(default=None, sa_column=Column(Text))
    certificate_id: str = Field(foreign_key="certificates.id", index=True, max_length=36)
    signing_policy_id: str | None = Field(
        default=None, foreign_key="signing_policies.id", index=True, max_length=36
    )
    status: str = Field(default="active", max_length=16)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class SignerMember(SQLModel, table=True):
    __tablename__ = "signer_members"
    signer_id: str = Field(foreign_key="signers.id", primary_key=True, max_length=36)
    identity_id: str = Field(foreign_key="identities.id", primary_key=True, max_length=36)


class SigningRequest(SQLModel, table=True):
    """The API's view of a request; the workflow owns it and writes every transition here."""

    __tablename__ = "signing_requests"
    __table_args__ = (
        Index("ix_signing_requests_status_created", "status", "created_at"),
        Index("ix_signing_requests_signer_requester_status", "signer_id", "requester_id", "status"),
    )
    id: str = Field(primary_key=True, max_length=36)
    workflow_id: str = Field(max_length=80)
    status: str = Field(max_length=16)
    version: int = 0
    signer_id: str = Field(max_length=36)
    signer_name: str = Field(max_length=64)
    signing_policy_id: str | None = Field(default=None, max_length=36)
    requester_id: str = Field(index=True, max_length=36)
    requester_name: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    closed_at: datetime | None = None
    grant_id: str | None = Field(default=None, max_length=36)
    pre_approval_id: str | None = Field(default=None, max_length=36)
    original_request_id: str | None = Field(default=None, index=True, max_length=36)
    signature: str | None = Field(default=None, sa_column=Column(Text))
    # The full request as the workflow last saw it (core.schemas.RequestState as JSON).
    state: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))


class Grant(SQLModel, table=True):
    __tablename__ = "grants"
    __table_args__ = (Index("ix_grants_lookup", "signer_id", "identity_id", "status"),)
    id: str = Field(primary_key=True, max_length=36)
    request_id: str = Field(unique=True, max_length=36)
    signer_id: str = Field(max_length=36)
    identity_id: str = Field(index=True, max_length=36)
    valid_from: datetime
    valid_until: datetime
    allowed_sign_operations: int
    used_sign_operations: int = 0
    status: str = Field(default="active", max_length=16)
    revoked_at: datetime | None = None
    revoke_reason: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)


class SigningOperation(SQLModel, table=True):
    __tablename__ = "signing_operations"
    __table_args__ = (Index("ix_signing_operations_signer_at", "signer_id", "at"),)
    id: str = Field(primary_key=True, max_length=36)
    at: datetime = Field(default_factory=utcnow)
    signer_id: str = Field(max_length=36)
    actor_id: str = Field(max_length=36)
    status: str = Field(max_length=16)
    signing_algorithm: str = Field(max_length=40)
    data_sha256: str = Field(max_length=64)
    grant_id: str | None = Field(default=None, max_length=36)
    request_id: str | None = Field(default=None, max_length=36)
    client_metadata: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    ip_address: str | None = Field(default=None, max_length=64)
    error: str | None = Field(default=None, sa_column=Column(Text))


class PreApproval(SQLModel, table=True):
    __tablename__ = "pre_approvals"
    __table_args__ = (Index("ix_pre_approvals_match", "signer_id", "identity_id", "status"),)
    id: str = Field(primary_key=True, max_length=36)
    signer_id: str = Field(max_length=36)
    identity_id: str = Field(max_length=36)
    created_by: str = Field(max_length=36)
    comment: str = Field(sa_column=Column(Text, nullable=False))
    not_before: datetime
    expires_at: datetime
    single_use: bool = False
    ip_address: str | None = Field(default=None, max_length=64)
    signing_executable: str | None = Field(default=None, sa_column=Column(Text))
    status: str = Field(default="active", max_length=16)
    used_count: int = 0
    last_used_request_id: str | None = Field(default=None, max_length=36)
    revoked_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


class AuditHead(SQLModel, table=True):
    """One row: the chain's head. Locking it serialises appends so sequence numbers have no gaps."""

    __tablename__ = "audit_head"
    id: int = Field(primary_key=True)
    seq: int = 0
    hash: str = Field(max_length=64)


class SecurityEpoch(SQLModel, table=True):
    """One row: a counter that triggers bump on any change to tokens, identities, signers,
    certificates or memberships (migration 0003); the sign path's cached reads are valid while
    it stands still."""

    __tablename__ = "security_epoch"
    id: int = Field(primary_key=True)
    value: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_events"
    __table_args__ = (
        UniqueConstraint("seq", name="uq_audit_events_seq"),
        # Partial on SQLite: the sign path's events are filed into them a little later (0004).
        Index("ix_audit_events_entity", "entity_type", "entity_id", sqlite_where=text("indexed = 1")),
        Index("ix_audit_events_actor_id", "actor_id", sqlite_where=text("indexed = 1")),
        Index("ix_audit_events_action", "action", sqlite_where=text("indexed = 1")),
        Index("ix_audit_events_request_id", "request_id", sqlite_where=text("indexed = 1")),
    )
    id: str = Field(primary_key=True, max_length=36)
    seq: int
    at: datetime
    actor_id: str | None = Field(default=None, max_length=36)
    actor_name: str | None = Field(default=None, max_length=128)
    action: str = Field(max_length=64)
    entity_type: str = Field(max_length=32)
    entity_id: str = Field(max_length=36)
    # The signing request an event belongs to, so one request's whole history is one query.
    request_id: str | None = Field(default=None, max_length=36)
    data: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    ip_address: str | None = Field(default=None, max_length=64)
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)
    # 0: written by the SQLite sign path, not yet in the partial indexes (see store.deferred).
    indexed: int = Field(default=1, sa_column_kwargs={"server_default": "1"})


class IndexMark(SQLModel, table=True):
    """Per table, the last row whose index entries are filed (migration 0004): for
    `audit_events`, every event up to this seq is in the filter indexes."""

    __tablename__ = "index_marks"
    name: str = Field(primary_key=True, max_length=64)
    value: int = Field(sa_column=Column(BigInteger, nullable=False))
