"""SigningRequestWorkflow: one durable workflow per signing request.

It owns the approval lifecycle: it walks the policy's steps in order on approve/reject/cancel
updates, honours machine bypass and pre-approvals, expires the request on a durable timer,
and on approval has an activity issue the grant (and sign the artifact, when there is one).
Every transition is written to the database through an activity, in order, before the update
that caused it returns.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from core.schemas import (
        Approval,
        AuditNote,
        ClaimPreApprovalInput,
        DecisionInput,
        IssuedGrant,
        IssueGrantInput,
        OpenRequestInput,
        PersistRequestInput,
        PreApprovalSignal,
        RecordApprovalInput,
        ReleasePreApprovalInput,
        RequestState,
        SignArtifactInput,
        SignArtifactOutcome,
        SigningRequestInput,
        opened_note,
    )
    from core.temporal import (
        REQUESTER_NAME,
        SIGNER_NAME,
        SIGNING_POLICY,
        SIGNING_STATUS,
    )

NOT_ELIGIBLE = "NotEligible"
LOCAL_ACTIVITIES_PATCH = "local-activities"
# The opening write and its pre-approval claim as one activity; an approval's writes (notes,
# grant, approved state) as one activity and one transaction.
ONE_TRANSACTION_PATCH = "one-transaction-transitions"
# Without a pre-approval in sight at creation, the opening write and claim wait (see run).
DEFERRED_OPENING_PATCH = "deferred-opening"
DEFERRED_OPENING_DELAY = timedelta(hours=1)
REQUEST_NOT_OPEN = "RequestNotOpen"

ACTIVITY_TIMEOUT = timedelta(seconds=30)
ACTIVITY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
)


@workflow.defn(name="SigningRequestWorkflow")
class SigningRequestWorkflow:
    @workflow.init
    def __init__(self, input: SigningRequestInput) -> None:
        self._request: RequestState = input.request.model_copy(deep=True)
        self._policy = input.policy
        self._granting = False
        self._pre_approval_pending = False
        self._pre_approval_wake_at: datetime | None = None
        self._wake_changed = False
        self._persist_lock = asyncio.Lock()
        self._opened = False
        self._opening_due: datetime | None = None
        if self._request.steps and self._request.current_step is None:
            self._request.current_step = 0
            self._request.steps[0].status = "in-progress"

    # ----------------------------------------------------------------- run
    @workflow.run
    async def run(self, input: SigningRequestInput) -> RequestState:
        request = self._request
        opened = [opened_note(request)]
        machine_bypass = (
            self._policy is not None
            and self._policy.allow_machine_bypass
            and request.requester_kind == "machine"
        )
        if workflow.patched(ONE_TRANSACTION_PATCH):
            may_claim = bool(request.steps) and not machine_bypass
            if may_claim and not input.pre_approval_possible and workflow.patched(DEFERRED_OPENING_PATCH):
                # The API writes the request (version 0, with its opened event) before it
                # answers, found no pre-approval for it, and looks again once the row is
                # committed (signalling this workflow if one appeared meanwhile): nothing for the
                # first workflow task to do, so an approval sent right away is not held up by
                # it. The opening write and claim still run if the request is open an hour
                # later, for the case of an API lost between starting this and answering.
                self._opened = True
                self._opening_due = min(workflow.now() + DEFERRED_OPENING_DELAY, request.expires_at)
                await self._wait_for_decision()
                await workflow.wait_condition(workflow.all_handlers_finished)
                return self._request
            claimed = await self._open(input.request, opened, claim=may_claim)
            if not request.steps:
                await self._approve_without_steps(None, "no approval steps")
            elif machine_bypass:
                await self._approve_without_steps("machine", "machine bypass")
            else:
                await self._use_claim(claimed)
        else:
            await self._persist(opened)
            if not request.steps:
                await self._approve_without_steps(None, "no approval steps")
            elif machine_bypass:
                await self._approve_without_steps("machine", "machine bypass")
            else:
                await self._try_pre_approval()
        await self._wait_for_decision()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._request

    async def _wait_for_decision(self) -> None:
        request = self._request
        while request.status == "open":
            now = workflow.now()
            remaining = (request.expires_at - now).total_seconds()
            if remaining <= 0 and not self._granting:
                await self._close("expired", None, None, "expired")
                return
            timeout: float | None = max(remaining, 0.001)
            if self._pre_approval_wake_at is not None:
                # A pre-approval that starts later releases this request when it starts.
                timeout = min(remaining, max((self._pre_approval_wake_at - now).total_seconds(), 0.001))
            if self._opening_due is not None:
                opening_in = max((self._opening_due - now).total_seconds(), 0.001)
                timeout = opening_in if timeout is None else min(timeout, opening_in)
            self._wake_changed = False
            try:
                await workflow.wait_condition(
                    lambda: request.status != "open" or self._pre_approval_pending or self._wake_changed,
                    timeout=timeout if not self._granting else None,
                )
            except TimeoutError:
                due = self._opening_due
                if due is not None and workflow.now() >= due:
                    self._opening_due = None
                    if request.status == "open" and not self._granting:
                        claim = workflow.now() < request.expires_at
                        await self._use_claim(await self._open(request, [opened_note(request)], claim=claim))
                    continue
                wake_at = self._pre_approval_wake_at
                if wake_at is not None and workflow.now() >= wake_at:
                    self._pre_approval_wake_at = None
                    self._pre_approval_pending = True
                elif request.status == "open" and not self._granting:
                    await self._close("expired", None, None, "expired")
                    continue
            if self._pre_approval_pending and request.status == "open" and not self._granting:
                self._pre_approval_pending = False
                await self._try_pre_approval()
            elif self._granting:
                await workflow.wait_condition(lambda: request.status != "open")

    async def _try_pre_approval(self) -> None:
        request = self._request
        if request.status != "open" or self._granting:
            return
        claimed: str | None = await self._activity("claim_pre_approval", self._claim_input(), result_type=str)
        await self._use_claim(claimed)

    def _claim_input(self) -> ClaimPreApprovalInput:
        request = self._request
        executable = request.client_metadata.get("signingExecutable")
        return ClaimPreApprovalInput(
            request_id=request.id,
            signer_id=request.signer_id,
            identity_id=request.requester_id,
            ip_address=request.ip_address,
            signing_executable=str(executable) if executable is not None else None,
        )

    async def _use_claim(self, claimed: str | None) -> None:
        """Approve by the claimed pre-approval, or give it back if the request was decided meanwhile."""
        request = self._request
        if not claimed:
            return
        if request.status == "open" and not self._granting:
            request.pre_approval_id = claimed
            await self._approve_without_steps("pre-approval", "pre-approval")
        else:
            await self._activity(
                "release_pre_approval",
                ReleasePreApprovalInput(pre_approval_id=claimed, request_id=request.id),
            )

    async def _approve_without_steps(self, bypass: str | None, reason: str) -> None:
        request = self._request
        self._granting = True
        for step in request.steps:
            step.status = "skipped"
        request.current_step = None
        if bypass == "machine":
            request.bypass = "machine"
        elif bypass == "pre-approval":
            request.bypass = "pre-approval"
        await self._grant_and_finish(
            [
                AuditNote(
                    action="signing_request.steps_skipped",
                    actor_id=request.requester_id,
                    actor_name=request.requester_name,
                    data={"reason": reason, "preApprovalId": request.pre_approval_id},
                )
            ]
        )

    # ------------------------------------------------------------- updates
    def _check_decidable(self, decision: DecisionInput) -> None:
        request = self._request
        if request.status != "open" or self._granting or request.current_step is None:
            raise ApplicationError("the request is no longer open", type=REQUEST_NOT_OPEN)
        if decision.actor_id == request.requester_id:
            raise ApplicationError("nobody may decide their own request", type=NOT_ELIGIBLE)
        step = request.steps[request.current_step]
        if decision.actor_id not in step.approver_ids:
            raise ApplicationError(f"not among the approvers of step {step.name!r}", type=NOT_ELIGIBLE)
        if any(a.approver_id == decision.actor_id for a in step.approvals):
            raise ApplicationError(f"already decided in step {step.name!r}", type=NOT_ELIGIBLE)

    @workflow.update
    async def approve(self, decision: DecisionInput) -> RequestState:
        self._check_decidable(decision)
        request = self._request
        assert request.current_step is not None
        index = request.current_step
        step = request.steps[index]
        step.approvals.append(
            Approval(
                approver_id=decision.actor_id,
                approver_name=decision.actor_name,
                decision="approved",
                comment=decision.comment,
                at=workflow.now(),
            )
        )
        notes = [
            AuditNote(
                action="signing_request.approval",
                actor_id=decision.actor_id,
                actor_name=decision.actor_name,
                data={"step": step.name, "stepIndex": index, "comment": decision.comment},
            )
        ]
        approved = sum(1 for a in step.approvals if a.decision == "approved")
        if approved < step.required_approvals:
            await self._persist(notes)
            return self._request
        step.status = "completed"
        notes.append(AuditNote(action="signing_request.step_completed", data={"step": step.name}))
        if index + 1 < len(request.steps):
            request.current_step = index + 1
            request.steps[index + 1].status = "in-progress"
            await self._persist(notes)
            return self._request
        request.current_step = None
        self._granting = True
        await self._grant_and_finish(notes)
        return self._request

    @approve.validator
    def _validate_approve(self, decision: DecisionInput) -> None:
        self._check_decidable(decision)

    @workflow.update
    async def reject(self, decision: DecisionInput) -> RequestState:
        self._check_decidable(decision)
        request = self._request
        assert request.current_step is not None
        step = request.steps[request.current_step]
        step.approvals.append(
            Approval(
                approver_id=decision.actor_id,
                approver_name=decision.actor_name,
                decision="rejected",
                comment=decision.comment,
                at=workflow.now(),
            )
        )
        await self._close("rejected", decision, decision.comment, "rejected")
        return self._request

    @reject.validator
    def _validate_reject(self, decision: DecisionInput) -> None:
        self._check_decidable(decision)

    @workflow.update
    async def cancel(self, decision: DecisionInput) -> RequestState:
        self._check_cancellable(decision)
        await self._close("cancelled", decision, decision.comment, "cancelled")
        return self._request

    @cancel.validator
    def _validate_cancel(self, decision: DecisionInput) -> None:
        self._check_cancellable(decision)

    def _check_cancellable(self, decision: DecisionInput) -> None:
        request = self._request
        if request.status != "open" or self._granting:
            raise ApplicationError("the request is no longer open", type=REQUEST_NOT_OPEN)
        if decision.actor_id != request.requester_id and not decision.actor_is_admin:
            raise ApplicationError("only the requester or an admin may cancel", type=NOT_ELIGIBLE)

    @workflow.signal
    def pre_approval_available(self, signal: PreApprovalSignal) -> None:
        if signal.not_before is not None and signal.not_before > workflow.now():
            if self._pre_approval_wake_at is None or signal.not_before < self._pre_approval_wake_at:
                self._pre_approval_wake_at = signal.not_before
                self._wake_changed = True
            return
        self._pre_approval_pending = True

    @workflow.query
    def state(self) -> RequestState:
        return self._request

    # ------------------------------------------------------------ helpers
    async def _close(
        self, status: str, actor: DecisionInput | None, comment: str | None, action: str
    ) -> None:
        request = self._request
        request.status = status  # type: ignore[assignment]
        request.closed_at = workflow.now()
        request.closed_by = actor.actor_id if actor else None
        request.close_comment = comment
        if request.current_step is not None:
            current = request.steps[request.current_step]
            if status == "rejected":
                current.status = "completed"
        await self._persist(
            [
                AuditNote(
                    action=f"signing_request.{action}",
                    actor_id=actor.actor_id if actor else None,
                    actor_name=actor.actor_name if actor else "system",
                    data={"comment": comment, "step": request.current_step},
                )
            ]
        )

    async def _grant_and_finish(self, notes: list[AuditNote]) -> None:
        """Issue the grant, sign the artifact if any, then mark the request approved.

        The status turns `approved` only once the grant exists, so a client that sees it can sign.
        """
        if workflow.patched(ONE_TRANSACTION_PATCH):
            await self._grant_and_finish_in_one_transaction(notes)
            return
        request = self._request
        await self._persist(notes)
        valid_from, valid_until = self._grant_window()
        issued: IssuedGrant = await self._activity(
            "issue_grant",
            IssueGrantInput(
                request_id=request.id,
                signer_id=request.signer_id,
                identity_id=request.requester_id,
                valid_from=valid_from,
                valid_until=valid_until,
                allowed_sign_operations=request.allowed_sign_operations,
            ),
            result_type=IssuedGrant,
        )
        request.grant_id = issued.grant_id
        request.valid_from = issued.valid_from
        request.valid_until = issued.valid_until
        if request.artifact is not None:
            await self._sign_artifact(issued.grant_id)
        self._mark_approved()
        self._granting = False
        await self._persist([self._approved_note()])

    async def _grant_and_finish_in_one_transaction(self, notes: list[AuditNote]) -> None:
        """The approval's notes, the grant and (without an artifact) the approved state, written
        by one activity in one transaction: the versions the older sequence wrote one activity
        each (notes as version n, approved as n + 1) with the same numbers and audit order.
        With an artifact: notes and grant in one, then the signature, then the approved state."""
        request = self._request
        valid_from, valid_until = self._grant_window()
        grant = IssueGrantInput(
            request_id=request.id,
            signer_id=request.signer_id,
            identity_id=request.requester_id,
            valid_from=valid_from,
            valid_until=valid_until,
            allowed_sign_operations=request.allowed_sign_operations,
            grant_id=str(workflow.uuid4()),
        )
        await self._after_opening()
        async with self._persist_lock:
            request.version += 1
            notes_version = request.version
            request.grant_id = grant.grant_id
            request.valid_from, request.valid_until = valid_from, valid_until
            after: list[AuditNote] = []
            if request.artifact is None:
                request.version += 1
                self._mark_approved()
                after = [self._approved_note()]
            issued: IssuedGrant = await self._activity(
                "record_approval",
                RecordApprovalInput(
                    state=request.model_copy(deep=True),
                    notes_version=notes_version,
                    notes=notes,
                    grant=grant,
                    notes_after_grant=after,
                ),
                result_type=IssuedGrant,
            )
            request.grant_id = issued.grant_id
            request.valid_from = issued.valid_from
            request.valid_until = issued.valid_until
        self._upsert_search_attributes()
        if request.artifact is None:
            self._granting = False
            return
        await self._sign_artifact(issued.grant_id)
        self._mark_approved()
        self._granting = False
        await self._persist([self._approved_note()])

    def _grant_window(self) -> tuple[datetime, datetime]:
        """The grant's window: the request's own when fixed, else from now for its length."""
        request = self._request
        if request.window_fixed:
            return request.valid_from, request.valid_until
        now = workflow.now()
        return now, now + timedelta(seconds=request.window_seconds)

    async def _sign_artifact(self, grant_id: str) -> None:
        """Sign the request's artifact under its grant; the signature or the error lands on the request."""
        request = self._request
        assert request.artifact is not None
        outcome: SignArtifactOutcome = await self._activity(
            "sign_artifact",
            SignArtifactInput(
                request_id=request.id,
                grant_id=grant_id,
                signer_id=request.signer_id,
                identity_id=request.requester_id,
                identity_name=request.requester_name,
                artifact=request.artifact,
                client_metadata=request.client_metadata,
                ip_address=request.ip_address,
            ),
            result_type=SignArtifactOutcome,
        )
        request.signature = outcome.signature
        request.signing_error = outcome.error

    def _mark_approved(self) -> None:
        self._request.status = "approved"
        self._request.closed_at = workflow.now()

    def _approved_note(self) -> AuditNote:
        request = self._request
        return AuditNote(
            action="signing_request.approved",
            actor_name="system",
            data={
                "grantId": request.grant_id,
                "signed": request.signature is not None,
                "signingError": request.signing_error,
            },
        )

    async def _open(self, opening: RequestState, notes: list[AuditNote], *, claim: bool) -> str | None:
        """The opening write (the request as it was opened, or as it is now when deferred) and,
        with `claim`, the pre-approval claim: one activity. Unless deferred, every later write
        waits for it (`_after_opening`)."""
        async with self._persist_lock:
            self._request.version += 1
            claim = claim and self._request.status == "open" and not self._granting
            claimed: str | None = await self._activity(
                "open_request",
                OpenRequestInput(
                    persist=PersistRequestInput(
                        state=opening.model_copy(deep=True, update={"version": self._request.version}),
                        notes=notes,
                    ),
                    claim=self._claim_input() if claim else None,
                ),
                result_type=str,
            )
            self._opened = True
        self._upsert_search_attributes()
        return claimed

    async def _after_opening(self) -> None:
        """An update delivered with the workflow's start runs before `run` does: its writes wait
        for the opening write, so the request's first version and first audit event are its
        opening (histories from before the patch keep their order)."""
        if not self._opened and workflow.patched(ONE_TRANSACTION_PATCH):
            await workflow.wait_condition(lambda: self._opened)

    async def _activity(self, name: str, arg: Any, result_type: type | None = None) -> Any:
        """Run an activity as a local activity where the history allows it.

        A local activity runs in the worker that runs the workflow, without a round trip through
        the server's task queue, which takes most of the latency out of every transition.
        Histories recorded before this change replay with regular activities.
        """
        if workflow.patched(LOCAL_ACTIVITIES_PATCH):
            return await workflow.execute_local_activity(
                name,
                arg,
                result_type=result_type,
                start_to_close_timeout=ACTIVITY_TIMEOUT,
                retry_policy=ACTIVITY_RETRY,
            )
        return await workflow.execute_activity(
            name,
            arg,
            result_type=result_type,
            start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
        )

    async def _persist(self, notes: list[AuditNote]) -> None:
        """Write the whole request to the database, one version at a time, in order."""
        await self._after_opening()
        async with self._persist_lock:
            self._request.version += 1
            snapshot = self._request.model_copy(deep=True)
            await self._activity(
                "persist_request",
                PersistRequestInput(state=snapshot, notes=notes),
            )
        self._upsert_search_attributes()

    def _upsert_search_attributes(self) -> None:
        workflow.upsert_search_attributes(
            [
                SIGNING_STATUS.value_set(self._request.status),
                SIGNER_NAME.value_set(self._request.signer_name),
                REQUESTER_NAME.value_set(self._request.requester_name),
                SIGNING_POLICY.value_set(self._request.signing_policy_name or "none"),
            ]
        )
