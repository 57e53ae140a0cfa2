"""Committed workflow histories must replay against the current workflow code.

A change to SigningRequestWorkflow that would break requests already running fails here;
such a change goes behind `workflow.patched(...)`. To add histories of new shapes, run
`SIGNGATE_RECORD_HISTORIES=1 pytest tests/test_replay.py`, which stores fresh ones named
`<CURRENT_SHAPE>-<case>.json`; bump CURRENT_SHAPE with each patch so older shapes keep theirs.
Shapes committed: `v1-regular-activities-*` (activities through the task queue), unprefixed
(local activities, one per write), `v3-one-transaction-*` (opening write and claim in one
activity, an approval's notes, grant and approved state in one activity and transaction),
`v4-deferred-opening-*` (no opening activity when the API saw no pre-approval; the opening
write an hour later: `-fired`, recorded by tests/test_workflow_durability.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from core.temporal import DATA_CONVERTER
from tests.conftest import Api
from workflows.signing_request import SigningRequestWorkflow

HISTORIES = Path(__file__).parent / "histories"
CURRENT_SHAPE = "v4-deferred-opening"


def _history_files() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


def test_histories_are_committed() -> None:
    assert len(_history_files()) >= 3, "replay histories are missing from tests/histories"


@pytest.mark.parametrize("path", _history_files(), ids=lambda p: p.stem)
async def test_replay_committed_history(path: Path) -> None:
    history = WorkflowHistory.from_json("signing-request-replay", json.loads(path.read_text()))
    replayer = Replayer(workflows=[SigningRequestWorkflow], data_converter=DATA_CONVERTER)
    await replayer.replay_workflow(history)


async def test_fresh_histories_of_every_shape_replay(api: Api, temporal_env, tmp_path: Path) -> None:
    """Runs requests of each shape, replays their histories; with SIGNGATE_RECORD_HISTORIES set,
    also stores them as the committed histories."""
    target = HISTORIES if os.environ.get("SIGNGATE_RECORD_HISTORIES") else tmp_path
    requester = await api.identity()
    a, b, c = [await api.identity() for _ in range(3)]
    machine = await api.identity(kind="machine")
    two_step = await api.policy([([a, b], 2), ([c], 1)])
    signer = await api.signer(members=[requester, machine], policy_id=two_step["id"])

    approved = await api.open_request(requester, signer["id"])
    for who in (a, b, c):
        await api.call("POST", f"/pki/signing-requests/{approved['id']}/approve", who, json={}, expect=200)
    rejected = await api.open_request(requester, signer["id"])
    await api.call(
        "POST", f"/pki/signing-requests/{rejected['id']}/reject", a, json={"comment": "no"}, expect=200
    )
    cancelled = await api.open_request(requester, signer["id"])
    await api.call("POST", f"/pki/signing-requests/{cancelled['id']}/cancel", requester, json={}, expect=200)

    bypass_policy = await api.policy([([a], 1)], allowMachineBypass=True)
    bypass_signer = await api.signer(members=[machine], policy_id=bypass_policy["id"])
    import base64
    import hashlib

    artifact = {
        "digest": base64.b64encode(hashlib.sha256(b"replay").digest()).decode(),
        "digestAlgorithm": "SHA256",
        "signingAlgorithm": "ECDSA_SHA256",
        "format": "cms",
    }
    bypassed = await api.open_request(machine, bypass_signer["id"], artifact=artifact)

    one_step = await api.policy([([a], 1)])
    one_step_signer = await api.signer(members=[requester], policy_id=one_step["id"])
    one_step_approved = await api.open_request(requester, one_step_signer["id"])
    await api.call("POST", f"/pki/signing-requests/{one_step_approved['id']}/approve", a, json={}, expect=200)
    pre_body = {"signerId": one_step_signer["id"], "identityId": requester.id, "comment": "replay"}
    await api.call("POST", "/pki/pre-approvals", a, json={**pre_body, "singleUse": True}, expect=201)
    pre_approved = await api.open_request(requester, one_step_signer["id"])

    for name, req in (
        ("two-step-approved", approved),
        ("rejected", rejected),
        ("cancelled", cancelled),
        ("machine-bypass-cms", bypassed),
        ("one-step-approved", one_step_approved),
        ("pre-approved", pre_approved),
    ):
        handle = temporal_env.client.get_workflow_handle(req["workflowId"])
        await handle.result()
        history = await handle.fetch_history()
        (target / f"{CURRENT_SHAPE}-{name}.json").write_text(json.dumps(history.to_json_dict(), indent=1))
        replayer = Replayer(workflows=[SigningRequestWorkflow], data_converter=DATA_CONVERTER)
        await replayer.replay_workflow(history)
