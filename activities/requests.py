"""Activities of the signing-request workflow: persistence, grants, artifact signing, pre-approvals.

Each is idempotent, because Temporal retries activities: persistence is versioned, the grant
is keyed on the request id, the artifact signature is stored on the request row once, and a
pre-approval claim is one conditional UPDATE remembered per request.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import logging
import uuid
from typing import Any

from sqlalchemy import Engine, insert, or_, select, text, update
from sqlmodel import col
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.schemas import (
    AuditNote,
    ClaimPreApprovalInput,
    IssuedGrant,
    IssueGrantInput,
    OpenRequestInput,
    PersistRequestInput,
    RecordApprovalInput,
    ReleasePreApprovalInput,
    RequestState,
    SignArtifactInput,
    SignArtifactOutcome,
)
from core.timeutil import utcnow
from store import audit, deferred
from store.db import session_scope
from store.models import AuditEvent, Certificate, Grant, PreApproval, SigningRequest

log = logging.getLogger(__name__)


class RequestActivities:
    def __init__(self, engine: Engine, key_store: Any) -> None:
        self.engine = engine
        self.key_store = key_store

    @activity.defn(name="persist_request")
    def persist_request(self, input: PersistRequestInput) -> None:
        persist_request_state(self.engine, input)

    @activity.defn(name="issue_grant")
    def issue_grant(self, input: IssueGrantInput) -> IssuedGrant:
        with session_scope(self.engine) as session:
            grant, _ = _issue_grant(session, input, record=True)
            return grant

    @activity.defn(name="open_request")
    def open_request(self, input: OpenRequestInput) -> str | None:
        """The workflow's opening write, then (if asked) its pre-approval claim: one activity,
        two transactions. The request is committed before the claim reads pre-approvals, so a
        pre-approval committed after that read finds the request open when it looks for
        waiting requests to release (see api/routes/pre_approvals.py).

        A note already recorded for the request is not recorded again: the API records the
        `opened` event with the row it inserts (version 0), the workflow's opening write
        records it only when the API's write did not happen (first, or at all)."""
        with session_scope(self.engine) as session:
            state = input.persist.state
            if _store(session, _locked_row(session, state.id), state):
                _record_notes(session, state.id, _not_yet_recorded(session, state.id, input.persist.notes))
            if input.claim is None:
                return None
            session.commit()
            return _claim_pre_approval(session, input.claim)

    @activity.defn(name="record_approval")
    def record_approval(self, input: RecordApprovalInput) -> IssuedGrant:
        return record_approval(self.engine, input)

    @activity.defn(name="sign_artifact")
    def sign_artifact(self, input: SignArtifactInput) -> SignArtifactOutcome:
        """Sign the request's artifact with one operation of its grant, exactly once."""
        from core.errors import SigngateError
        from store import signing

        with session_scope(self.engine) as session:
            row = session.get(SigningRequest, input.request_id)
            if row is not None and row.signature:
                return SignArtifactOutcome(signature=row.signature)
        artifact = input.artifact
        actor = audit.Actor(id=input.identity_id, name=input.identity_name, ip_address=input.ip_address)
        try:
            if artifact.format == "cms":
                signature = self._sign_cms(input, actor)
            else:
                result = signing.sign(
                    self.engine,
                    self.key_store,
                    signer_id=input.signer_id,
                    actor=actor,
                    signing_algorithm=artifact.signing_algorithm,
                    data_b64=artifact.digest,
                    is_digest=True,
                    client_metadata={**input.client_metadata, "requestId": input.request_id},
                    grant_id=input.grant_id,
                    require_grant=True,
                    store_signature_on_request=input.request_id,
                )
                signature = base64.b64encode(result.signature).decode()
        except SigngateError as exc:
            if exc.status_code >= 500:
                raise ApplicationError(exc.description, type="SigningFailed") from exc
            log.warning("artifact of request %s not signed: %s", input.request_id, exc.description)
            return SignArtifactOutcome(error=exc.description)
        return SignArtifactOutcome(signature=signature)

    def _sign_cms(self, input: SignArtifactInput, actor: audit.Actor) -> str:
        from pki.certificates import parse_certificate_pem, parse_chain_pem
        from pki.cms import cms_detached_from_digest
        from store import signing

        artifact = input.artifact
        with session_scope(self.engine) as session:
            key = signing.load_signer_key(session, input.signer_id)
            cert_row = session.get(Certificate, key.certificate_id)
            assert cert_row is not None and cert_row.certificate_pem is not None
            cert_pem, chain_pem = cert_row.certificate_pem, cert_row.chain_pem

        def build(private_key: Any) -> bytes:
            return cms_detached_from_digest(
                private_key,
                parse_certificate_pem(cert_pem),
                parse_chain_pem(chain_pem) if chain_pem else [],
                base64.b64decode(artifact.digest),
                artifact.digest_algorithm,
                artifact.signing_algorithm,
            )

        result = signing.sign(
            self.engine,
            self.key_store,
            signer_id=input.signer_id,
            actor=actor,
            signing_algorithm=artifact.signing_algorithm,
            data_b64=artifact.digest,
            is_digest=False,
            client_metadata={**input.client_metadata, "requestId": input.request_id, "format": "cms"},
            grant_id=input.grant_id,
            require_grant=True,
            store_signature_on_request=input.request_id,
            producer=build,
        )
        return base64.b64encode(result.signature).decode()

    @activity.defn(name="release_pre_approval")
    def release_pre_approval(self, input: ReleasePreApprovalInput) -> None:
        """Give back a claim the request could not use (it was decided while claiming), so a
        single-use pre-approval still serves exactly one request. Idempotent per request."""
        with session_scope(self.engine) as session:
            released = session.execute(
                select(AuditEvent.id).where(  # type: ignore[call-overload]
                    *deferred.visible(
                        session,
                        [
                            col(AuditEvent.request_id) == input.request_id,
                            col(AuditEvent.action) == "pre_approval.released",
                        ],
                    )
                )
            ).first()
            row = session.get(PreApproval, input.pre_approval_id, with_for_update=True)
            if released is not None or row is None:
                return
            row.used_count = max(row.used_count - 1, 0)
            if row.single_use and row.status == "used":
                row.status = "active"
            if row.last_used_request_id == input.request_id:
                row.last_used_request_id = None
            session.add(row)
            session.flush()
            audit.record(
                session,
                actor=audit.SYSTEM,
                action="pre_approval.released",
                entity_type="pre_approval",
                entity_id=row.id,
                request_id=input.request_id,
                data={"reason": "the request was decided while the pre-approval was claimed"},
            )

    @activity.defn(name="claim_pre_approval")
    def claim_pre_approval(self, input: ClaimPreApprovalInput) -> str | None:
        """Claim a matching pre-approval atomically; a single-use one serves exactly one request.

        Each candidate is taken with one conditional UPDATE, so of several requests racing for a
        single-use pre-approval exactly one sees its row change. The `pre_approval.used` audit
        event, written in the same transaction, marks the claim: a retried activity (its first
        attempt committed, its answer lost) returns that claim instead of counting a second use.
        """
        with session_scope(self.engine) as session:
            return _claim_pre_approval(session, input)


def _claim_pre_approval(session: Any, input: ClaimPreApprovalInput) -> str | None:
    """Claim a matching pre-approval in the caller's transaction (see claim_pre_approval)."""
    now = utcnow()
    earlier = session.execute(
        select(AuditEvent.entity_id).where(  # type: ignore[call-overload]
            *deferred.visible(
                session,
                [
                    col(AuditEvent.request_id) == input.request_id,
                    col(AuditEvent.action) == "pre_approval.used",
                ],
            )
        )
    ).first()
    if earlier is not None:
        return str(earlier[0])
    addresses = _address_forms(input.ip_address)
    candidates = session.execute(
        select(PreApproval.id, PreApproval.single_use)  # type: ignore[call-overload]
        .where(
            PreApproval.signer_id == input.signer_id,
            PreApproval.identity_id == input.identity_id,
            PreApproval.status == "active",
            PreApproval.not_before <= now,
            PreApproval.expires_at > now,
            or_(
                PreApproval.ip_address.is_(None),  # type: ignore[union-attr]
                PreApproval.ip_address.in_(addresses),  # type: ignore[union-attr]
            ),
            or_(
                PreApproval.signing_executable.is_(None),  # type: ignore[union-attr]
                PreApproval.signing_executable == input.signing_executable,
            ),
        )
        .order_by(PreApproval.single_use.desc(), PreApproval.expires_at)  # type: ignore[attr-defined]
    ).all()
    for pre_approval_id, single_use in candidates:
        values: dict[str, Any] = {
            "used_count": PreApproval.used_count + 1,
            "last_used_request_id": input.request_id,
        }
        if single_use:
            values["status"] = "used"
        claimed = session.execute(
            update(PreApproval)
            .where(
                PreApproval.id == pre_approval_id,  # type: ignore[arg-type]
                PreApproval.status == "active",  # type: ignore[arg-type]
                PreApproval.expires_at > now,  # type: ignore[arg-type]
            )
            .values(**values)
            .returning(PreApproval.id)  # type: ignore[arg-type]
        ).first()
        if claimed is not None:
            audit.record(
                session,
                actor=audit.SYSTEM,
                action="pre_approval.used",
                entity_type="pre_approval",
                entity_id=pre_approval_id,
                request_id=input.request_id,
                data={"singleUse": bool(single_use), "identityId": input.identity_id},
            )
            return str(pre_approval_id)
    return None


def _address_forms(address: str | None) -> list[str]:
    """The request's address as a pre-approval may spell it: normalised, and an IPv4-mapped
    IPv6 address (what a dual-stack listener reports) also as plain IPv4."""
    if not address:
        return []
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return [address]
    forms = [address, str(parsed)]
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        forms.append(str(parsed.ipv4_mapped))
    return sorted(set(forms))


def _row_values(state: Any, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": state.id,
        "workflow_id": state.workflow_id,
        "status": state.status,
        "version": state.version,
        "signer_id": state.signer_id,
        "signer_name": state.signer_name,
        "signing_policy_id": state.signing_policy_id,
        "requester_id": state.requester_id,
        "requester_name": state.requester_name,
        "created_at": state.created_at,
        "expires_at": state.expires_at,
        "closed_at": state.closed_at,
        "grant_id": state.grant_id,
        "pre_approval_id": state.pre_approval_id,
        "original_request_id": state.original_request_id,
        "signature": state.signature,
        "state": payload,
    }


def _insert_if_absent(session: Any, values: dict[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING: the API (version 0) and the workflow (version 1) may
    both write a new request at once; a row lock cannot guard a row that does not exist yet."""
    from sqlalchemy.dialects import postgresql, sqlite

    if session.get_bind().dialect.name == "postgresql":
        statement: Any = postgresql.insert(SigningRequest)
    else:
        statement = sqlite.insert(SigningRequest)
    statement = (
        statement.values(**values).on_conflict_do_nothing(index_elements=["id"]).returning(SigningRequest.id)
    )
    # RETURNING, not rowcount: an ORM-enabled INSERT reports rowcount -1 on psycopg, which made
    # the workflow's opening write (when it beat the API's) skip its `opened` audit event.
    return session.execute(statement).first() is not None


def persist_request_state(engine: Engine, input: PersistRequestInput) -> bool:
    """Write one version of the request; older or repeated versions are ignored. True if written."""
    with session_scope(engine) as session:
        return _persist(session, input)


def _persist(session: Any, input: PersistRequestInput) -> bool:
    """`persist_request_state` in the caller's transaction."""
    state = input.state
    stored = _locked_version(session, state.id)
    if stored is None:
        if not _store(session, None, state):
            return False
    elif stored >= state.version:
        return False
    else:
        _update_row(session, state)
    audit.record_many(session, _note_events(state.id, input.notes))
    return True


def _locked_row(session: Any, request_id: str) -> SigningRequest | None:
    return session.get(SigningRequest, request_id, with_for_update=True)  # type: ignore[no-any-return]


_REQUESTS = SigningRequest.__table__  # type: ignore[attr-defined]
_GRANTS = Grant.__table__  # type: ignore[attr-defined]


def _locked_version(session: Any, request_id: str) -> int | None:
    """The stored version of the request, its row locked (PostgreSQL) until the commit; None
    without a row. Only the version: the writes below replace the row's columns wholesale."""
    found = session.execute(
        select(_REQUESTS.c.version).where(_REQUESTS.c.id == request_id).with_for_update()
    ).first()
    return int(found[0]) if found is not None else None


def _update_row(session: Any, state: RequestState) -> None:
    """Write `state` over the request's row (locked, and older: see `_locked_version`), the
    columns `_store` writes, in one UPDATE."""
    values: dict[str, Any] = {
        "status": state.status,
        "version": state.version,
        "closed_at": state.closed_at,
        "grant_id": state.grant_id,
        "pre_approval_id": state.pre_approval_id,
        "state": state.model_dump(mode="json"),
    }
    if state.signature:
        values["signature"] = state.signature
    session.execute(update(_REQUESTS).where(_REQUESTS.c.id == state.id).values(**values))


def _store(session: Any, row: SigningRequest | None, state: RequestState) -> bool:
    """Write `state` over `row` (locked), or insert it when there is no row yet; an older or
    repeated version is ignored. True if written."""
    payload = state.model_dump(mode="json")
    if row is None:
        if _insert_if_absent(session, _row_values(state, payload)):
            return True
        # The API wrote version 0 meanwhile.
        row = session.get(SigningRequest, state.id, with_for_update=True, populate_existing=True)
        assert row is not None
    if row.version >= state.version:
        return False
    row.status = state.status
    row.version = state.version
    row.closed_at = state.closed_at
    row.grant_id = state.grant_id
    row.pre_approval_id = state.pre_approval_id
    if state.signature:
        row.signature = state.signature
    row.state = payload
    session.add(row)
    session.flush()
    return True


def _with_grant(state: RequestState, issued: IssuedGrant) -> RequestState:
    """The request as written with its grant: the grant's id and window, as issued."""
    return state.model_copy(
        update={
            "grant_id": issued.grant_id,
            "valid_from": issued.valid_from,
            "valid_until": issued.valid_until,
        }
    )


def _new_grant(input: IssueGrantInput) -> Grant:
    """The grant row an approval issues (its id chosen by the workflow, so a retry finds it)."""
    return Grant(
        id=input.grant_id or str(uuid.uuid4()),
        request_id=input.request_id,
        signer_id=input.signer_id,
        identity_id=input.identity_id,
        valid_from=input.valid_from,
        valid_until=input.valid_until,
        allowed_sign_operations=input.allowed_sign_operations,
    )


def _issue_grant(session: Any, input: IssueGrantInput, *, record: bool) -> tuple[IssuedGrant, bool]:
    """The request's grant, inserted unless it exists (keyed on the request id, so a retried
    activity finds the first attempt's). True when inserted now; its `grant.issued` event is
    recorded here with `record`, else left to the caller (to keep the audit order)."""
    existing = session.execute(
        select(_GRANTS.c.id, _GRANTS.c.valid_from, _GRANTS.c.valid_until).where(
            _GRANTS.c.request_id == input.request_id
        )
    ).first()
    if existing is not None:
        return IssuedGrant(grant_id=existing[0], valid_from=existing[1], valid_until=existing[2]), False
    grant = _new_grant(input)
    session.execute(insert(_GRANTS).values(**grant.model_dump()))
    if record:
        audit.record_many(session, [_grant_issued(grant.id, input)])
    return IssuedGrant(grant_id=grant.id, valid_from=grant.valid_from, valid_until=grant.valid_until), True


def _grant_issued(grant_id: str, input: IssueGrantInput) -> audit.PendingEvent:
    return audit.PendingEvent(
        actor=audit.SYSTEM,
        action="grant.issued",
        entity_type="grant",
        entity_id=grant_id,
        request_id=input.request_id,
        data={
            "signerId": input.signer_id,
            "identityId": input.identity_id,
            "validFrom": input.valid_from,
            "validUntil": input.valid_until,
            "allowedSignOperations": input.allowed_sign_operations,
        },
    )


def record_approval(engine: Engine, input: RecordApprovalInput) -> IssuedGrant:
    """An approval's writes in one transaction: the notes that approved it (as version
    `notes_version`), the grant, and the request's new state with its notes; their audit
    events in that order, appended last. Idempotent as a whole: a retried attempt whose first
    one committed finds the versions written and the grant there, writes nothing and returns
    the grant.

    Each part is also skipped on its own when it is already there, which is what a request
    approved half-way by the earlier sequence of activities (notes persisted, perhaps the grant
    issued, then the worker lost) needs when it is completed by this one.
    """
    state = input.state
    with session_scope(engine) as session:
        if session.get_bind().dialect.name == "postgresql":
            done = _record_approval_in_one_write(session, input)
            if done is not None:
                return done
        found = _locked_version(session, state.id)
        stored = found if found is not None else -1
        issued, inserted = _issue_grant(session, input.grant, record=False)
        events: list[audit.PendingEvent] = []
        if stored < input.notes_version:
            events += _note_events(state.id, input.notes)
        if inserted:
            events.append(_grant_issued(issued.grant_id, input.grant))
        if stored < state.version:
            state = _with_grant(state, issued)
            if found is not None:
                _update_row(session, state)
            if found is not None or _store(session, None, state):
                notes = [_naming_grant(n, issued.grant_id) for n in input.notes_after_grant]
                events += _note_events(state.id, notes)
        audit.record_many(session, events)
    return issued


# The request row and the audit head locked, in that order (the order of the general path):
# nothing else is read under the head's lock, and the one statement of writes that follows
# sets it. The head is held from here to the commit, which is no longer than when it was
# advanced by a statement of its own (one round trip fewer).
_PG_VERSION_GRANT_AND_HEAD = text(
    "SELECT r.version, g.id, g.valid_from, g.valid_until, h.seq, h.hash FROM signing_requests r"
    " LEFT JOIN grants g ON g.request_id = r.id CROSS JOIN audit_head h"
    " WHERE r.id = :id AND h.id = 1 FOR UPDATE OF r, h"
)


_PG_NEW_GRANT = (
    "new_grant AS (INSERT INTO grants (id, request_id, signer_id, identity_id, valid_from,"
    " valid_until, allowed_sign_operations, used_sign_operations, status, revoked_at,"
    " revoke_reason, created_at) VALUES (:g_id, :g_request_id, :g_signer_id, :g_identity_id,"
    " :g_valid_from, :g_valid_until, :g_allowed_sign_operations, :g_used_sign_operations,"
    " :g_status, :g_revoked_at, :g_revoke_reason, :g_created_at) RETURNING 1)"
)
# The signature is written only when the state has one, as `_store` does.
_PG_REQUEST_ROW = (
    "request_row AS (UPDATE signing_requests SET status = :status, version = :version,"
    " closed_at = :closed_at, grant_id = :grant_id, pre_approval_id = :pre_approval_id,"
    " state = CAST(:state AS json), signature = COALESCE(CAST(:signature AS text), signature)"
    " WHERE id = :id RETURNING 1)"
)
_PG_SET_HEAD = "UPDATE audit_head SET seq = :seq, hash = :hash WHERE id = 1"


@functools.lru_cache(maxsize=4)
def _pg_writes(insert_grant: bool, update_row: bool) -> Any:
    """One PostgreSQL statement: the grant inserted and the request row updated (each if
    asked), the chained audit events inserted and the audit head set to the last of them."""
    parts = [cte for cte, wanted in ((_PG_NEW_GRANT, insert_grant), (_PG_REQUEST_ROW, update_row)) if wanted]
    return text("WITH " + ", ".join([*parts, audit.PG_INSERT_EVENTS_CTE]) + " " + _PG_SET_HEAD)


def _record_approval_in_one_write(session: Any, input: RecordApprovalInput) -> IssuedGrant | None:
    """`record_approval` on PostgreSQL, the same writes and events in fewer round trips: the
    request row and the audit head locked and read with the request's grant (one statement),
    the grant, the row, the events and the head (one), then COMMIT. None, having written
    nothing, when the request has no row yet (the general path handles that)."""
    state = input.state
    conn = session.connection()
    found = conn.execute(_PG_VERSION_GRANT_AND_HEAD, {"id": state.id}).first()
    if found is None:
        return None
    stored = int(found[0])
    grant_values: dict[str, Any] | None = None
    if found[1] is not None:
        issued = IssuedGrant(grant_id=found[1], valid_from=found[2], valid_until=found[3])
    else:
        grant = input.grant
        grant_values = _new_grant(grant).model_dump()
        issued = IssuedGrant(
            grant_id=grant_values["id"], valid_from=grant.valid_from, valid_until=grant.valid_until
        )
    events: list[audit.PendingEvent] = []
    if stored < input.notes_version:
        events += _note_events(state.id, input.notes)
    if grant_values is not None:
        events.append(_grant_issued(issued.grant_id, input.grant))
    row_values: dict[str, Any] | None = None
    if stored < state.version:
        state = _with_grant(state, issued)
        row_values = {
            "id": state.id,
            "status": state.status,
            "version": state.version,
            "closed_at": state.closed_at,
            "grant_id": state.grant_id,
            "pre_approval_id": state.pre_approval_id,
            "state": json.dumps(state.model_dump(mode="json")),
            "signature": state.signature or None,
        }
        notes = [_naming_grant(n, issued.grant_id) for n in input.notes_after_grant]
        events += _note_events(state.id, notes)
    if not events:
        if grant_values is not None:
            conn.execute(insert(_GRANTS).values(**grant_values))
        if row_values is not None:
            _update_row(session, state)
        return issued
    rows = audit.chained_rows(events, (int(found[4]), str(found[5])))
    params: dict[str, Any] = {
        **(row_values or {}),
        "events": audit.pg_events_document(rows),
        "seq": rows[-1]["seq"],
        "hash": rows[-1]["hash"],
    }
    if grant_values is not None:
        params.update({f"g_{k}": v for k, v in grant_values.items()})
    conn.execute(_pg_writes(grant_values is not None, row_values is not None), params)
    return issued


def _naming_grant(note: AuditNote, grant_id: str) -> AuditNote:
    """A note that names the grant names the one that exists (the workflow chose the id before
    the activity ran; an earlier attempt of the older sequence may have issued another)."""
    if "grantId" in note.data and note.data["grantId"] != grant_id:
        return note.model_copy(update={"data": {**note.data, "grantId": grant_id}})
    return note


def _not_yet_recorded(session: Any, request_id: str, notes: list[AuditNote]) -> list[AuditNote]:
    if not notes:
        return notes
    recorded = set(
        session.execute(
            select(AuditEvent.action).where(  # type: ignore[call-overload]
                *deferred.visible(
                    session,
                    [
                        col(AuditEvent.request_id) == request_id,
                        col(AuditEvent.action).in_([n.action for n in notes]),
                    ],
                )
            )
        ).scalars()
    )
    return [n for n in notes if n.action not in recorded]


def _record_notes(session: Any, request_id: str, notes: list[AuditNote]) -> None:
    audit.record_many(session, _note_events(request_id, notes))


def _note_events(request_id: str, notes: list[AuditNote]) -> list[audit.PendingEvent]:
    return [
        audit.PendingEvent(
            actor=audit.Actor(id=note.actor_id, name=note.actor_name),
            action=note.action,
            entity_type="signing_request",
            entity_id=request_id,
            request_id=request_id,
            data=note.data,
        )
        for note in notes
    ]
