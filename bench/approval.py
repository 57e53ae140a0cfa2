"""Benchmark 2: approval latency, from the start of the final approve call to a sign call that
succeeds under the grant that approval created.

One request at a time (a latency, not a load): open a request for one operation, approve the
earlier steps untimed, then time the last approve and sign at once, retrying while the answer is
403 approval_required. The grant of the previous request is spent by its own sign, so only the
new grant can serve the call; the answer's grantId is checked against the approved request's.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

from bench.fixtures import Api, Fixtures
from bench.loadgen import percentile

SIGN_RETRY_LIMIT = 5.0


async def history_timeline(temporal_address: str, workflow_id: str) -> list[str]:
    """The last request's history from the final approve's acceptance on, in ms: where the time goes."""
    from temporalio.client import Client

    client = await Client.connect(temporal_address)
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    events = list(history.events)
    accepted = [e for e in events if e.HasField("workflow_execution_update_accepted_event_attributes")]
    if not accepted:
        return []
    start = accepted[-1].event_time.ToDatetime()
    lines = []
    for event in events:
        at = event.event_time.ToDatetime()
        if at < start:
            continue
        kind = event.WhichOneof("attributes") or ""
        detail = ""
        if kind == "activity_task_scheduled_event_attributes":
            detail = event.activity_task_scheduled_event_attributes.activity_type.name
        lines.append(
            f"{(at - start).total_seconds() * 1000:8.1f} ms  {kind.removesuffix('_event_attributes')} {detail}"
        )
    return lines


async def measure(
    api: Api, fx: Fixtures, signer_key: str, count: int, temporal_address: str | None = None
) -> dict[str, Any]:
    signer = fx.signers[signer_key]
    steps = 3 if signer_key == "ec3" else 1
    totals: list[float] = []
    approve_calls: list[float] = []
    retries = 0
    for _ in range(count):
        request = await api.open_request(fx.requester, signer["id"], 1)
        for step in range(steps - 1):
            await api.approve(fx.approvers[step], request["id"])
        body = {
            "data": base64.b64encode(secrets.token_bytes(32)).decode(),
            "signingAlgorithm": "ECDSA_SHA256",
            "isDigest": True,
        }
        t0 = time.perf_counter()
        state = await api.approve(fx.approvers[steps - 1], request["id"])
        approve_calls.append(time.perf_counter() - t0)
        while True:
            r = await api.http.post(
                f"/pki/signers/{signer['id']}/sign", headers=fx.requester.headers, json=body
            )
            if r.status_code == 200:
                break
            if r.status_code == 403 and r.json().get("error") == "approval_required":
                retries += 1
                if time.perf_counter() - t0 > SIGN_RETRY_LIMIT:
                    raise RuntimeError("no usable grant 5 s after the final approval")
                continue
            raise RuntimeError(f"sign after approval: {r.status_code} {r.text[:300]}")
        totals.append(time.perf_counter() - t0)
        if r.json()["grantId"] != state.get("grantId"):
            raise RuntimeError(
                f"signed under grant {r.json()['grantId']}, approval issued {state.get('grantId')}"
            )
    timeline = await history_timeline(temporal_address, request["workflowId"]) if temporal_address else []
    totals.sort()
    approve_calls.sort()
    return {
        "steps": steps,
        "count": count,
        "p50_ms": percentile(totals, 50) * 1000,
        "p95_ms": percentile(totals, 95) * 1000,
        "p99_ms": percentile(totals, 99) * 1000,
        "max_ms": totals[-1] * 1000,
        "approve_call_p50_ms": percentile(approve_calls, 50) * 1000,
        "approve_call_p99_ms": percentile(approve_calls, 99) * 1000,
        "sign_retries": retries,
        "last_request_timeline": timeline,
    }
