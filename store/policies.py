"""Signing policies: ordered approval steps and the ceilings a request must stay within."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session

from core.errors import BadRequest, Conflict, NotFound
from core.schemas import PolicySnapshot, PolicyStep
from core.timeutil import utcnow
from store import audit
from store.models import Identity, Signer, SigningPolicy, SigningRequest


def validate_steps(session: Session, steps: list[dict[str, Any]]) -> None:
    if not steps:
        raise BadRequest("a policy needs at least one approval step", code="invalid_policy")
    names = set()
    for step in steps:
        approvers = step["approverIds"]
        if len(set(approvers)) != len(approvers):
            raise BadRequest(f"step {step['name']!r} lists an approver twice", code="invalid_policy")
        if not 1 <= step["requiredApprovals"] <= len(approvers):
            raise BadRequest(
                f"step {step['name']!r}: requiredApprovals must be between 1 and {len(approvers)}",
                code="invalid_policy",
            )
        if step["name"] in names:
            raise BadRequest(f"two steps are named {step['name']!r}", code="invalid_policy")
        names.add(step["name"])
        found = session.execute(
            select(func.count()).select_from(Identity).where(Identity.id.in_(approvers))  # type: ignore[attr-defined]
        ).scalar_one()
        if found != len(approvers):
            raise BadRequest(f"step {step['name']!r} names an unknown approver", code="unknown_identity")


def create_policy(*, session: Session, body: dict[str, Any], actor: audit.Actor) -> SigningPolicy:
    validate_steps(session, body["steps"])
    if session.execute(select(SigningPolicy.id).where(SigningPolicy.name == body["name"])).first():  # type: ignore[call-overload]
        raise Conflict(f"a policy named {body['name']!r} exists", code="name_taken")
    policy = SigningPolicy(
        id=str(uuid.uuid4()),
        name=body["name"],
        steps=body["steps"],
        max_window_seconds=body.get("maxWindowSeconds"),
        max_signings=body.get("maxSignings"),
        request_ttl_seconds=body.get("requestTtlSeconds") or 604800,
        allow_machine_bypass=bool(body.get("allowMachineBypass") or False),
    )
    session.add(policy)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="signing_policy.created",
        entity_type="signing_policy",
        entity_id=policy.id,
        data=body,
    )
    return policy


def update_policy(
    *, session: Session, policy_id: str, changes: dict[str, Any], actor: audit.Actor
) -> SigningPolicy:
    policy = get_policy(session, policy_id)
    if "steps" in changes:
        validate_steps(session, changes["steps"])
        policy.steps = changes["steps"]
    if "name" in changes and changes["name"] != policy.name:
        if session.execute(select(SigningPolicy.id).where(SigningPolicy.name == changes["name"])).first():  # type: ignore[call-overload]
            raise Conflict(f"a policy named {changes['name']!r} exists", code="name_taken")
        policy.name = changes["name"]
    for wire, attr in (
        ("maxWindowSeconds", "max_window_seconds"),
        ("maxSignings", "max_signings"),
        ("requestTtlSeconds", "request_ttl_seconds"),
        ("allowMachineBypass", "allow_machine_bypass"),
    ):
        if wire in changes:
            value = changes[wire]
            if attr == "request_ttl_seconds" and value is None:
                value = 604800
            setattr(policy, attr, value)
    policy.updated_at = utcnow()
    session.add(policy)
    audit.record(
        session,
        actor=actor,
        action="signing_policy.updated",
        entity_type="signing_policy",
        entity_id=policy.id,
        data=changes,
    )
    return policy


def delete_policy(*, session: Session, policy_id: str, actor: audit.Actor) -> None:
    policy = get_policy(session, policy_id)
    in_use = session.execute(select(Signer.id).where(Signer.signing_policy_id == policy_id).limit(1)).first()  # type: ignore[call-overload]
    open_requests = session.execute(
        select(SigningRequest.id)  # type: ignore[call-overload]
        .where(SigningRequest.signing_policy_id == policy_id, SigningRequest.status == "open")
        .limit(1)
    ).first()
    if in_use or open_requests:
        raise Conflict("the policy is in use by a signer or an open request", code="policy_in_use")
    session.delete(policy)
    audit.record(
        session,
        actor=actor,
        action="signing_policy.deleted",
        entity_type="signing_policy",
        entity_id=policy_id,
        data={"name": policy.name},
    )


def get_policy(session: Session, policy_id: str) -> SigningPolicy:
    policy = session.get(SigningPolicy, policy_id)
    if policy is None:
        raise NotFound("no such signing policy")
    return policy


def snapshot(policy: SigningPolicy) -> PolicySnapshot:
    return PolicySnapshot(
        id=policy.id,
        name=policy.name,
        steps=[
            PolicyStep(
                name=s["name"], approver_ids=list(s["approverIds"]), required_approvals=s["requiredApprovals"]
            )
            for s in policy.steps
        ],
        max_window_seconds=policy.max_window_seconds,
        max_signings=policy.max_signings,
        request_ttl_seconds=policy.request_ttl_seconds,
        allow_machine_bypass=policy.allow_machine_bypass,
    )
