"""Committed workflow histories must replay against the current workflow code.

A change to SigningRequestWorkflow that would break requests already running fails here;
such a change goes behind `workflow.patched(...)`. To add histories of new shapes, run
`SIGNGATE_RECORD_HISTORIES=1 pytest tests/test_replay.py`, which stores fresh ones.
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

    for name, req in (
        ("two-step-approved", approved),
        ("rejected", rejected),
        ("cancelled", cancelled),
        ("machine-bypass-cms", bypassed),
    ):
        handle = temporal_env.client.get_workflow_handle(req["workflowId"])
        await handle.result()
        history = await handle.fetch_history()
        (target / f"{name}.json").write_text(json.dumps(history.to_json_dict(), indent=1))
        replayer = Replayer(workflows=[SigningRequestWorkflow], data_converter=DATA_CONVERTER)
        await replayer.replay_workflow(history)
