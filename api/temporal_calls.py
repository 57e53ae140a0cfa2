"""Temporal calls from the API, with Temporal's failures mapped to the contract's errors."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from core.errors import NotEligible, NotFound, RequestNotOpen, SigngateError, Unavailable
from core.schemas import DecisionInput, PreApprovalSignal, RequestState, SigningRequestInput
from core.temporal import REQUESTER_NAME, SIGNER_NAME, SIGNING_POLICY, SIGNING_STATUS

WORKFLOW_NAME = "SigningRequestWorkflow"


def _map_rpc(exc: RPCError) -> SigngateError:
    if exc.status == RPCStatusCode.NOT_FOUND:
        if "completed" in exc.message.lower():
            return RequestNotOpen("the request is no longer open")
        return NotFound("no workflow for this request")
    if exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
        return Unavailable("Temporal is unreachable")
    return Unavailable(f"Temporal refused the call: {exc.message}")


async def start_request(client: Client, task_queue: str, input: SigningRequestInput) -> None:
    state = input.request
    try:
        await client.start_workflow(
            WORKFLOW_NAME,
            input,
            id=state.workflow_id,
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(SIGNING_STATUS, state.status),
                    SearchAttributePair(SIGNER_NAME, state.signer_name),
                    SearchAttributePair(REQUESTER_NAME, state.requester_name),
                    SearchAttributePair(SIGNING_POLICY, state.signing_policy_name or "none"),
                ]
            ),
            rpc_timeout=timedelta(seconds=10),
        )
    except RPCError as exc:
        raise _map_rpc(exc) from exc


async def decide(
    client: Client,
    workflow_id: str,
    update: str,
    decision: DecisionInput,
    *,
    idempotency_key: str | None,
    rpc_timeout: float,
) -> RequestState:
    """Run an approve/reject/cancel update; answers once the workflow has made it durable."""
    handle = client.get_workflow_handle(workflow_id)
    try:
        result = await handle.execute_update(
            update,
            decision,
            id=idempotency_key or str(uuid.uuid4()),
            result_type=RequestState,
            rpc_timeout=timedelta(seconds=rpc_timeout),
        )
    except WorkflowUpdateFailedError as exc:
        cause = exc.cause
        if isinstance(cause, ApplicationError):
            if cause.type == "NotEligible":
                raise NotEligible(cause.message) from exc
            if cause.type == "RequestNotOpen":
                raise RequestNotOpen(cause.message) from exc
        raise Unavailable("the request's workflow failed the decision") from exc
    except WorkflowUpdateRPCTimeoutOrCancelledError as exc:
        raise Unavailable("no worker answered in time; the decision was not confirmed") from exc
    except RPCError as exc:
        raise _map_rpc(exc) from exc
    assert isinstance(result, RequestState)
    return result


async def signal_pre_approval(
    client: Client, workflow_id: str, pre_approval_id: str, not_before: datetime | None = None
) -> None:
    try:
        await client.get_workflow_handle(workflow_id).signal(
            "pre_approval_available",
            PreApprovalSignal(pre_approval_id=pre_approval_id, not_before=not_before),
        )
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise _map_rpc(exc) from exc
