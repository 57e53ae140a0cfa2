"""The workflow under time skipping and injected activity failures, with real activities and database."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from temporalio import activity
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.requests import RequestActivities
from core.schemas import (
    IssuedGrant,
    PolicySnapshot,
    PolicyStep,
    RecordApprovalInput,
    RequestState,
    SigningRequestInput,
    StepState,
)
from core.temporal import DATA_CONVERTER, SEARCH_ATTRIBUTE_KEYS
from core.timeutil import utcnow
from store import audit
from store.db import session_scope
from store.models import Grant, SigningRequest
from tests.conftest import TEST_SERVER_BIN
from worker import request_activities, workflow_runner
from workflows.signing_request import SigningRequestWorkflow


def _input(ttl: timedelta, approver_ids: list[str], requester_id: str = "req-1") -> SigningRequestInput:
    request_id = str(uuid.uuid4())
    now = utcnow()
    policy = PolicySnapshot(
        id="policy-1",
        name="policy",
        steps=[PolicyStep(name="release", approver_ids=approver_ids, required_approvals=1)],
        request_ttl_seconds=int(ttl.total_seconds()),
    )
    state = RequestState(
        id=request_id,
        workflow_id=f"signing-request-{request_id}",
        signer_id="signer-1",
        signer_name="signer",
        certificate_id="cert-1",
        signing_policy_id=policy.id,
        signing_policy_name=policy.name,
        requester_id=requester_id,
        requester_name="requester",
        requester_kind="user",
        valid_from=now,
        valid_until=now + timedelta(hours=1),
        window_seconds=3600,
        allowed_sign_operations=1,
        steps=[StepState(name="release", required_approvals=1, approver_ids=approver_ids)],
        created_at=now,
        expires_at=now + ttl,
    )
    return SigningRequestInput(request=state, policy=policy)


@pytest.fixture(scope="module")
async def skipping_env():
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest

    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(TEST_SERVER_BIN), data_converter=DATA_CONVERTER
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for key in SEARCH_ATTRIBUTE_KEYS
            },
        )
    )
    yield env
    await env.shutdown()


def _worker(client: Client, acts: RequestActivities, task_queue: str) -> Worker:
    import concurrent.futures

    return Worker(
        client,
        task_queue=task_queue,
        workflows=[SigningRequestWorkflow],
        workflow_runner=workflow_runner(),
        activities=request_activities(acts),
        activity_executor=concurrent.futures.ThreadPoolExecutor(4),
    )


async def test_seven_day_ttl_expires_under_time_skipping(skipping_env, engine, app) -> None:
    task_queue = f"tq-{uuid.uuid4()}"
    acts = RequestActivities(engine, app.state.ctx.key_store)
    wf_input = _input(timedelta(days=7), ["approver-1"])
    async with _worker(skipping_env.client, acts, task_queue):
        handle = await skipping_env.client.start_workflow(
            SigningRequestWorkflow.run, wf_input, id=wf_input.request.workflow_id, task_queue=task_queue
        )
        result = await handle.result()
    assert result.status == "expired"
    assert result.closed_at is not None
    assert result.closed_at - result.created_at >= timedelta(days=7)
    with session_scope(engine) as session:
        row = session.get(SigningRequest, wf_input.request.id)
        assert row is not None and row.status == "expired"


class CrashAfterApproval(RequestActivities):
    """Commits the approval (notes, grant, approved state), then fails as if the worker died
    before reporting completion."""

    attempts = 0

    @activity.defn(name="record_approval")
    def record_approval(self, input: RecordApprovalInput) -> IssuedGrant:
        issued = super().record_approval(input)
        CrashAfterApproval.attempts += 1
        if activity.info().attempt == 1:
            raise RuntimeError("worker lost after commit")
        return issued


async def test_grant_issued_exactly_once_when_activity_retried(temporal_env, engine, app) -> None:
    from core.schemas import DecisionInput
    from store.models import AuditEvent

    task_queue = f"tq-{uuid.uuid4()}"
    acts = CrashAfterApproval(engine, app.state.ctx.key_store)
    wf_input = _input(timedelta(hours=1), ["approver-1"])
    async with _worker(temporal_env.client, acts, task_queue):
        handle = await temporal_env.client.start_workflow(
            SigningRequestWorkflow.run, wf_input, id=wf_input.request.workflow_id, task_queue=task_queue
        )
        state = await handle.execute_update(
            SigningRequestWorkflow.approve,
            DecisionInput(actor_id="approver-1", actor_name="approver"),
        )
        result = await handle.result()
    assert state.status == "approved"
    assert CrashAfterApproval.attempts >= 2
    with session_scope(engine) as session:
        count = session.execute(
            select(func.count()).select_from(Grant).where(Grant.request_id == wf_input.request.id)
        ).scalar_one()
        grant_id = session.execute(
            select(Grant.id).where(Grant.request_id == wf_input.request.id)
        ).scalar_one()
        row = session.get(SigningRequest, wf_input.request.id)
        assert row is not None
        row_status, row_grant = row.status, row.grant_id
        actions = list(
            session.execute(
                select(AuditEvent.action)  # type: ignore[call-overload]
                .where(AuditEvent.request_id == wf_input.request.id)
                .order_by(AuditEvent.seq)
            ).scalars()
        )
    assert count == 1
    assert result.grant_id == grant_id == state.grant_id == row_grant
    assert row_status == "approved"
    # Every event once, in the order of the changes, although the activity ran twice.
    assert actions == [
        "signing_request.opened",
        "signing_request.approval",
        "signing_request.step_completed",
        "grant.issued",
        "signing_request.approved",
    ]


def _request_actions(engine: Engine, request_id: str) -> list[str]:
    from store.models import AuditEvent

    with session_scope(engine) as session:
        return list(
            session.execute(
                select(AuditEvent.action)  # type: ignore[call-overload]
                .where(AuditEvent.request_id == request_id)
                .order_by(AuditEvent.seq)
            ).scalars()
        )


def test_the_opening_write_records_its_event_with_or_without_the_apis_version_0(engine) -> None:
    """The API writes version 0 right after starting the workflow, the workflow version 1 with
    the `opened` event; whichever lands first, the event is recorded once."""
    from activities.requests import persist_request_state
    from core.schemas import AuditNote, PersistRequestInput

    for api_first in (False, True):
        state = _input(timedelta(hours=1), ["approver-1"]).request
        opening = PersistRequestInput(
            state=state.model_copy(update={"version": 1}), notes=[AuditNote(action="signing_request.opened")]
        )
        if api_first:
            assert persist_request_state(engine, PersistRequestInput(state=state))
        assert persist_request_state(engine, opening)
        assert not persist_request_state(engine, opening)
        assert not persist_request_state(engine, PersistRequestInput(state=state))
        with session_scope(engine) as session:
            row = session.get(SigningRequest, state.id)
            assert row is not None and row.version == 1
        assert _request_actions(engine, state.id) == ["signing_request.opened"]


def _approval_input(state: RequestState, grant_id: str) -> RecordApprovalInput:
    from core.schemas import AuditNote, IssueGrantInput

    return RecordApprovalInput(
        state=state.model_copy(update={"version": 3, "status": "approved", "grant_id": grant_id}),
        notes_version=2,
        notes=[
            AuditNote(action="signing_request.approval"),
            AuditNote(action="signing_request.step_completed"),
        ],
        grant=IssueGrantInput(
            request_id=state.id,
            signer_id=state.signer_id,
            identity_id=state.requester_id,
            valid_from=state.valid_from,
            valid_until=state.valid_until,
            allowed_sign_operations=1,
            grant_id=grant_id,
        ),
        notes_after_grant=[AuditNote(action="signing_request.approved", data={"grantId": grant_id})],
    )


def test_record_approval_is_one_idempotent_transaction(engine) -> None:
    from activities.requests import persist_request_state, record_approval
    from core.schemas import PersistRequestInput

    state = _input(timedelta(hours=1), ["approver-1"]).request.model_copy(update={"version": 1})
    persist_request_state(engine, PersistRequestInput(state=state))
    approval = _approval_input(state, str(uuid.uuid4()))
    first = record_approval(engine, approval)
    again = record_approval(engine, approval)
    assert first == again
    assert first.grant_id == approval.grant.grant_id
    with session_scope(engine) as session:
        row = session.get(SigningRequest, state.id)
        assert row is not None
        assert (row.version, row.status, row.grant_id) == (3, "approved", first.grant_id)
        grants = session.execute(select(Grant.id).where(Grant.request_id == state.id)).scalars().all()
    assert grants == [first.grant_id]
    assert _request_actions(engine, state.id) == [
        "signing_request.approval",
        "signing_request.step_completed",
        "grant.issued",
        "signing_request.approved",
    ]
    with session_scope(engine) as session:
        assert audit.verify(session).valid


def test_record_approval_completes_an_approval_the_older_sequence_left_half_done(engine) -> None:
    """Notes persisted and a grant issued by the one-activity-per-write sequence, then the
    worker lost: the merged activity adds only what is missing and names the existing grant."""
    from activities.requests import RequestActivities, persist_request_state, record_approval
    from core.schemas import PersistRequestInput
    from store.models import AuditEvent

    state = _input(timedelta(hours=1), ["approver-1"]).request.model_copy(update={"version": 1})
    persist_request_state(engine, PersistRequestInput(state=state))
    approval = _approval_input(state, str(uuid.uuid4()))
    persist_request_state(
        engine,
        PersistRequestInput(state=state.model_copy(update={"version": 2}), notes=approval.notes),
    )
    older = RequestActivities(engine, key_store=None).issue_grant(
        approval.grant.model_copy(update={"grant_id": None})
    )
    assert older.grant_id != approval.grant.grant_id
    issued = record_approval(engine, approval)
    assert issued.grant_id == older.grant_id
    with session_scope(engine) as session:
        row = session.get(SigningRequest, state.id)
        assert row is not None
        assert (row.version, row.status, row.grant_id) == (3, "approved", older.grant_id)
        assert row.state["grant_id"] == older.grant_id
        approved = session.execute(
            select(AuditEvent.data).where(  # type: ignore[call-overload]
                AuditEvent.request_id == state.id, AuditEvent.action == "signing_request.approved"
            )
        ).scalar_one()
    assert approved["grantId"] == older.grant_id
    assert _request_actions(engine, state.id) == [
        "signing_request.approval",
        "signing_request.step_completed",
        "grant.issued",
        "signing_request.approved",
    ]


async def test_deferred_opening_writes_the_request_an_api_lost_before_writing_it(
    skipping_env, engine, app
) -> None:
    """The API found no pre-approval, so the workflow's first task does nothing; had the API
    died before writing the request, the workflow writes it (with its opened event) an hour
    later, still open and still decidable."""
    from core.schemas import DecisionInput

    task_queue = f"tq-{uuid.uuid4()}"
    acts = RequestActivities(engine, app.state.ctx.key_store)
    # Long enough to outlast the time another test in this module has skipped already.
    wf_input = _input(timedelta(days=30), ["approver-1"]).model_copy(update={"pre_approval_possible": False})
    async with _worker(skipping_env.client, acts, task_queue):
        handle = await skipping_env.client.start_workflow(
            SigningRequestWorkflow.run, wf_input, id=wf_input.request.workflow_id, task_queue=task_queue
        )
        await skipping_env.sleep(timedelta(minutes=30))
        with session_scope(engine) as session:
            assert session.get(SigningRequest, wf_input.request.id) is None
        await skipping_env.sleep(timedelta(minutes=31))
        with session_scope(engine) as session:
            row = session.get(SigningRequest, wf_input.request.id)
            assert row is not None
            assert (row.status, row.version) == ("open", 1)
        assert _request_actions(engine, wf_input.request.id) == ["signing_request.opened"]
        state = await handle.execute_update(
            SigningRequestWorkflow.approve, DecisionInput(actor_id="approver-1", actor_name="approver")
        )
        assert state.status == "approved"
        await handle.result()
        await _record_and_replay(handle, "v4-deferred-opening-fired")
    assert _request_actions(engine, wf_input.request.id) == [
        "signing_request.opened",
        "signing_request.approval",
        "signing_request.step_completed",
        "grant.issued",
        "signing_request.approved",
    ]


async def _record_and_replay(handle: Any, name: str) -> None:
    """Replay the finished workflow's history; with SIGNGATE_RECORD_HISTORIES set, also store it
    among the committed histories (see tests/test_replay.py)."""
    import json
    import os
    from pathlib import Path

    from temporalio.worker import Replayer

    history = await handle.fetch_history()
    if os.environ.get("SIGNGATE_RECORD_HISTORIES"):
        target = Path(__file__).parent / "histories" / f"{name}.json"
        target.write_text(json.dumps(history.to_json_dict(), indent=1))
    await Replayer(workflows=[SigningRequestWorkflow], data_converter=DATA_CONVERTER).replay_workflow(history)
