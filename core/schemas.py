"""Plain models shared by the API, the activities and the workflows (no I/O, sandbox-safe)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RequestStatus = Literal["open", "approved", "rejected", "cancelled", "expired"]
StepStatus = Literal["pending", "in-progress", "completed", "skipped"]
Decision = Literal["approved", "rejected"]
DigestAlgorithm = Literal["SHA256", "SHA384", "SHA512"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"approved", "rejected", "cancelled", "expired"})


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class PolicyStep(Frozen):
    name: str
    approver_ids: list[str]
    required_approvals: int


class PolicySnapshot(Frozen):
    """The policy as it stood when the request was opened: later edits never reach old requests."""

    id: str
    name: str
    steps: list[PolicyStep]
    max_window_seconds: int | None = None
    max_signings: int | None = None
    request_ttl_seconds: int = 604800
    allow_machine_bypass: bool = False


class Artifact(Frozen):
    name: str | None = None
    digest: str  # base64
    digest_algorithm: DigestAlgorithm
    signing_algorithm: str
    format: Literal["raw", "cms"] = "raw"


class Approval(BaseModel):
    approver_id: str
    approver_name: str
    decision: Decision
    comment: str | None = None
    at: datetime


class StepState(BaseModel):
    name: str
    required_approvals: int
    approver_ids: list[str]
    status: StepStatus = "pending"
    approvals: list[Approval] = Field(default_factory=list)


class RequestState(BaseModel):
    """A signing request as its workflow sees it; the database row stores this as JSON."""

    id: str
    workflow_id: str
    status: RequestStatus = "open"
    version: int = 0
    signer_id: str
    signer_name: str
    certificate_id: str
    signing_policy_id: str | None
    signing_policy_name: str | None = None
    requester_id: str
    requester_name: str
    requester_kind: str
    justification: str | None = None
    valid_from: datetime
    valid_until: datetime
    # Without an explicit window from the client, the window starts when the grant is issued.
    window_seconds: int
    window_fixed: bool = False
    allowed_sign_operations: int
    artifact: Artifact | None = None
    origin: dict[str, str] = Field(default_factory=dict)
    client_metadata: dict[str, Any] = Field(default_factory=dict)
    ip_address: str | None = None
    current_step: int | None = None
    steps: list[StepState] = Field(default_factory=list)
    pre_approval_id: str | None = None
    grant_id: str | None = None
    signature: str | None = None
    signing_error: str | None = None
    original_request_id: str | None = None
    resubmission_ids: list[str] = Field(default_factory=list)
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None = None
    closed_by: str | None = None
    close_comment: str | None = None
    bypass: Literal["machine", "pre-approval"] | None = None

    @property
    def is_open(self) -> bool:
        return self.status == "open"


class SigningRequestInput(BaseModel):
    """Workflow input: everything the request needs, resolved by the API at creation."""

    request: RequestState
    policy: PolicySnapshot | None
    # False when the API found no active pre-approval for this signer and requester: the
    # workflow then leaves its opening write and claim for later (see the workflow's
    # deferred-opening patch); a pre-approval made meanwhile releases the request by signal.
    pre_approval_possible: bool = True


def opened_note(request: RequestState) -> AuditNote:
    """The `signing_request.opened` event, recorded with the request's first row."""
    return AuditNote(
        action="signing_request.opened",
        actor_id=request.requester_id,
        actor_name=request.requester_name,
        data={
            "signerId": request.signer_id,
            "signerName": request.signer_name,
            "signingPolicyId": request.signing_policy_id,
            "originalRequestId": request.original_request_id,
            "artifact": request.artifact.model_dump() if request.artifact else None,
        },
    )


class DecisionInput(BaseModel):
    """Update input for approve, reject and cancel; the API resolves the actor from its token."""

    actor_id: str
    actor_name: str
    actor_is_admin: bool = False
    comment: str | None = None


class PreApprovalSignal(BaseModel):
    pre_approval_id: str | None = None
    # Set when the pre-approval starts later: the workflow claims it then.
    not_before: datetime | None = None


class AuditNote(BaseModel):
    """An audit event the workflow asks the persistence activity to append with its write."""

    action: str
    actor_id: str | None = None
    actor_name: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class PersistRequestInput(BaseModel):
    state: RequestState
    notes: list[AuditNote] = Field(default_factory=list)


class IssueGrantInput(BaseModel):
    request_id: str
    signer_id: str
    identity_id: str
    valid_from: datetime
    valid_until: datetime
    allowed_sign_operations: int
    # Chosen by the workflow (deterministic) so the request's state can name it before it exists.
    grant_id: str | None = None


class IssuedGrant(BaseModel):
    grant_id: str
    valid_from: datetime
    valid_until: datetime


class SignArtifactInput(BaseModel):
    request_id: str
    grant_id: str
    signer_id: str
    identity_id: str
    identity_name: str | None = None
    artifact: Artifact
    client_metadata: dict[str, Any] = Field(default_factory=dict)
    ip_address: str | None = None


class SignArtifactOutcome(BaseModel):
    signature: str | None = None
    operation_id: str | None = None
    error: str | None = None


class ClaimPreApprovalInput(BaseModel):
    request_id: str
    signer_id: str
    identity_id: str
    ip_address: str | None = None
    signing_executable: str | None = None


class OpenRequestInput(BaseModel):
    """The workflow's opening write and, once it is committed, its pre-approval claim (if any)."""

    persist: PersistRequestInput
    claim: ClaimPreApprovalInput | None = None


class RecordApprovalInput(BaseModel):
    """An approval's writes as one transaction: the step's notes (`notes_version`), the grant,
    and the request's new state (`state.version`, at or after `notes_version`) with its notes."""

    state: RequestState
    notes_version: int
    notes: list[AuditNote] = Field(default_factory=list)
    grant: IssueGrantInput
    notes_after_grant: list[AuditNote] = Field(default_factory=list)


class ReleasePreApprovalInput(BaseModel):
    pre_approval_id: str
    request_id: str
