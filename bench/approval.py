"""Benchmark 2: approval latency, from the start of the final approve call to a sign call that
succeeds under the grant that approval created.

One request at a time (a latency, not a load): open a request for one operation, approve the
earlier steps untimed, then time the last approve and sign at once, retrying while the answer is
403 approval_required. The grant of the previous request is spent by its own sign, so only the
new grant can serve the call; the answer's grantId is checked against the approved request's.

Two ways to come to the approval:
- `waiting`: every request is opened first, then each is approved in turn: an approver deciding
  a request that is open and waiting, as people and approval bots do (seconds to days later);
- right after opening: each request is approved as soon as its create call has answered, while
  its workflow's first task may still be running (a bot reacting within milliseconds): the
  approval then also waits for that task.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

from bench.fixtures import Api, Fixtures
from bench.loadgen import percentile

SIGN_RETRY_LIMIT = 5.0


async def history_timeline(
    temporal_address: str, workflow_id: str, approve_started: float | None = None
) -> list[str]:
    """The last request's whole history in ms from the start of the final approve call (wall
    clock, same machine; from the final update's acceptance without it): where the time goes.
    Local activities show as markers with their type and their own start/complete times."""
    import json
    from datetime import UTC, datetime

    from temporalio.client import Client

    client = await Client.connect(temporal_address)
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    events = list(history.events)
    if approve_started is not None:
        start = datetime.fromtimestamp(approve_started, UTC).replace(tzinfo=None)
    else:
        accepted = [e for e in events if e.HasField("workflow_execution_update_accepted_event_attributes")]
        if not accepted:
            return []
        start = accepted[-1].event_time.ToDatetime()

    def ms(at: datetime) -> str:
        return f"{(at - start).total_seconds() * 1000:8.1f} ms"

    lines = []
    for event in events:
        at = event.event_time.ToDatetime()
        kind = event.WhichOneof("attributes") or ""
        detail = ""
        if kind == "activity_task_scheduled_event_attributes":
            detail = event.activity_task_scheduled_event_attributes.activity_type.name
        elif kind == "marker_recorded_event_attributes":
            marker = event.marker_recorded_event_attributes
            if marker.marker_name == "core_local_activity" and "data" in marker.details:
                data = json.loads(marker.details["data"].payloads[0].data)
                done = data.get("complete_time") or {}
                done_at = datetime.fromtimestamp(done.get("seconds", 0) + done.get("nanos", 0) / 1e9, UTC)
                detail = f"local {data.get('activity_type')} (completed at {ms(done_at.replace(tzinfo=None)).strip()})"
            else:
                detail = marker.marker_name
        lines.append(f"{ms(at)}  {kind.removesuffix('_event_attributes')} {detail}")
    return lines


def _event_times(events: list[Any], kind: str) -> list[tuple[int, float]]:
    """(index, wall-clock seconds) of the events of one kind, in order."""
    from datetime import UTC

    return [
        (i, e.event_time.ToDatetime().replace(tzinfo=UTC).timestamp())
        for i, e in enumerate(events)
        if e.WhichOneof("attributes") == f"{kind}_event_attributes"
    ]


async def phase_summary(temporal_address: str, samples: list[tuple[str, float, float]]) -> list[str]:
    """Medians over every request of where the final approve call's time went, from each
    request's history (server clock, same machine as the wall clock here): the workflow task
    that accepted the final update, and the request's first task when that is another one."""
    import statistics

    from temporalio.client import Client

    client = await Client.connect(temporal_address)
    phases: dict[str, list[float]] = {}
    with_first_task = 0

    def add(name: str, value: float) -> None:
        phases.setdefault(name, []).append(value * 1000)

    for workflow_id, started, answered in samples:
        events = list((await client.get_workflow_handle(workflow_id).fetch_history()).events)
        scheduled = _event_times(events, "workflow_task_scheduled")
        task_started = _event_times(events, "workflow_task_started")
        completed = _event_times(events, "workflow_task_completed")
        accepted = _event_times(events, "workflow_execution_update_accepted")[-1][0]
        # The task that accepted the final update is the last one completed before it.
        final = max(n for n, (i, _) in enumerate(completed) if i < accepted)
        add(
            "workflow start -> approve call start",
            started - _event_times(events, "workflow_execution_started")[0][1],
        )
        add("first task scheduled -> started", task_started[0][1] - scheduled[0][1])
        if final == 0:
            with_first_task += 1
        else:
            add("first task started -> completed", completed[0][1] - task_started[0][1])
        add("approve call start -> final task scheduled", scheduled[final][1] - started)
        add("final task scheduled -> started", task_started[final][1] - scheduled[final][1])
        add("final task started -> completed (worker)", completed[final][1] - task_started[final][1])
        add("final task completed -> approve call answered", answered - completed[final][1])
    lines = [
        f"phases, median ms over {len(samples)} requests "
        f"({with_first_task} with the final update in the first workflow task):"
    ]
    lines += [f"  {statistics.median(v):7.1f}  {name} (n={len(v)})" for name, v in phases.items()]
    return lines


async def measure(
    api: Api,
    fx: Fixtures,
    signer_key: str,
    count: int,
    temporal_address: str | None = None,
    *,
    waiting: bool = True,
) -> dict[str, Any]:
    signer = fx.signers[signer_key]
    steps = 3 if signer_key == "ec3" else 1
    totals: list[float] = []
    approve_calls: list[float] = []
    retries = 0
    samples: list[tuple[str, float, float]] = []
    opened = [await api.open_request(fx.requester, signer["id"], 1) for _ in range(count)] if waiting else []
    for n in range(count):
        request = opened[n] if waiting else await api.open_request(fx.requester, signer["id"], 1)
        for step in range(steps - 1):
            await api.approve(fx.approvers[step], request["id"])
        body = {
            "data": base64.b64encode(secrets.token_bytes(32)).decode(),
            "signingAlgorithm": "ECDSA_SHA256",
            "isDigest": True,
        }
        approve_started = time.time()
        t0 = time.perf_counter()
        state = await api.approve(fx.approvers[steps - 1], request["id"])
        approve_calls.append(time.perf_counter() - t0)
        samples.append((request["workflowId"], approve_started, time.time()))
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
    timeline = (
        await history_timeline(temporal_address, request["workflowId"], approve_started)
        + await phase_summary(temporal_address, samples)
        if temporal_address
        else []
    )
    totals.sort()
    approve_calls.sort()
    return {
        "steps": steps,
        "count": count,
        "waiting": waiting,
        "p50_ms": percentile(totals, 50) * 1000,
        "p95_ms": percentile(totals, 95) * 1000,
        "p99_ms": percentile(totals, 99) * 1000,
        "max_ms": totals[-1] * 1000,
        "approve_call_p50_ms": percentile(approve_calls, 50) * 1000,
        "approve_call_p99_ms": percentile(approve_calls, 99) * 1000,
        "sign_retries": retries,
        "last_request_timeline": timeline,
    }
