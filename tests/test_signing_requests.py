"""The request workflow on the real dev server, through the public API."""

from __future__ import annotations

import asyncio
import base64
import hashlib

from tests.conftest import Api, Ident, assert_eventually


async def _setup_two_step(api: Api) -> tuple[Ident, list[Ident], Ident, dict, dict]:
    requester = await api.identity()
    first = [await api.identity() for _ in range(3)]
    release = await api.identity()
    policy = await api.policy([(first, 2), ([release], 1)], maxWindowSeconds=7200, maxSignings=10)
    signer = await api.signer(members=[requester], policy_id=policy["id"])
    return requester, first, release, policy, signer


async def test_two_step_policy_approved_in_order_then_grant_signs(api: Api) -> None:
    requester, first, release, _policy, signer = await _setup_two_step(api)
    req = await api.open_request(
        requester, signer["id"], justification="release 1.2.3", allowedSignOperations=2
    )
    assert req["status"] == "open"
    assert req["workflowId"] == f"signing-request-{req['id']}"
    assert [s["status"] for s in req["steps"]] == ["in-progress", "pending"]
    assert req["currentStep"] == 0

    # The release approver may not act on step 1.
    r = await api.call("POST", f"/pki/signing-requests/{req['id']}/approve", release, json={}, expect=403)
    assert r.json()["error"] == "not_eligible"

    r = await api.call(
        "POST", f"/pki/signing-requests/{req['id']}/approve", first[0], json={"comment": "ok"}, expect=200
    )
    assert r.json()["steps"][0]["approvals"][0]["approverName"] == first[0].name
    assert r.json()["steps"][0]["status"] == "in-progress"
    # Deciding twice in a step is refused.
    r = await api.call("POST", f"/pki/signing-requests/{req['id']}/approve", first[0], json={}, expect=403)
    assert r.json()["error"] == "not_eligible"

    r = await api.call("POST", f"/pki/signing-requests/{req['id']}/approve", first[1], json={}, expect=200)
    body = r.json()
    assert [s["status"] for s in body["steps"]] == ["completed", "in-progress"]
    assert body["currentStep"] == 1
    # A signature is refused until the last step completes.
    digest = base64.b64encode(hashlib.sha256(b"artifact").digest()).decode()
    sign = {"data": digest, "signingAlgorithm": "ECDSA_SHA256", "isDigest": True}
    r = await api.call("POST", f"/pki/signers/{signer['id']}/sign", requester, json=sign, expect=403)
    assert r.json()["error"] == "approval_required"

    r = await api.call(
        "POST", f"/pki/signing-requests/{req['id']}/approve", release, json={"comment": "ship"}, expect=200
    )
    body = r.json()
    assert body["status"] == "approved"
    assert body["grantId"]
    # The approve call returns once the grant exists: the pipeline can sign at once.
    r = await api.call("POST", f"/pki/signers/{signer['id']}/sign", requester, json=sign, expect=200)
    assert r.json()["grantId"] == body["grantId"]

    detail = (await api.call("GET", f"/pki/signing-requests/{req['id']}", requester, expect=200)).json()
    assert [s["status"] for s in detail["steps"]] == ["completed", "completed"]
    approvals = detail["steps"][1]["approvals"]
    assert approvals[0]["approverId"] == release.id
    assert approvals[0]["decision"] == "approved"
    assert approvals[0]["comment"] == "ship"
    assert approvals[0]["at"].endswith("Z")
    grant = (await api.call("GET", f"/pki/grants/{body['grantId']}", requester, expect=200)).json()
    assert grant["usedSignOperations"] == 1
    assert grant["allowedSignOperations"] == 2
    assert grant["status"] == "active"

    # Closed requests refuse further decisions with 409.
    r = await api.call("POST", f"/pki/signing-requests/{req['id']}/approve", first[2], json={}, expect=409)
    assert r.json()["error"] == "request_not_open"


async def test_requester_cannot_approve_own_request(api: Api) -> None:
    requester = await api.identity()
    other = await api.identity()
    policy = await api.policy([([requester, other], 1)])
    signer = await api.signer(members=[requester], policy_id=policy["id"])
    req = await api.open_request(requester, signer["id"])
    r = await api.call("POST", f"/pki/signing-requests/{req['id']}/approve", requester, json={}, expect=403)
    assert r.json()["error"] == "not_eligible"
    state = (await api.call("GET", f"/pki/signing-requests/{req['id']}", requester, expect=200)).json()
    assert state["steps"][0]["approvals"] == []


async def test_rejection_with_comment_ends_the_request(api: Api) -> None:
    requester, first, _release, _policy, signer = await _setup_two_step(api)
    req = await api.open_request(requester, signer["id"])
    r = await api.call(
        "POST",
        f"/pki/signing-requests/{req['id']}/reject",
        first[2],
        json={"comment": "unknown build"},
        expect=200,
    )
    body = r.json()
    assert body["status"] == "rejected"
    assert body["steps"][0]["approvals"][0]["decision"] == "rejected"
    assert body["steps"][0]["approvals"][0]["comment"] == "unknown build"
    assert body["closedAt"]
    await api.call("POST", f"/pki/signing-requests/{req['id']}/approve", first[0], json={}, expect=409)
    result = (
        await api.call(
            "GET", f"/pki/signing-requests/{req['id']}/result?waitSeconds=5", requester, expect=200
        )
    ).json()
    assert result["status"] == "rejected"
    assert result["grantId"] is None


async def test_cancel_by_requester_and_not_by_others(api: Api) -> None:
    requester, first, _release, _policy, signer = await _setup_two_step(api)
    req = await api.open_request(requester, signer["id"])
    r = await api.call("POST", f"/pki/signing-requests/{req['id']}/cancel", first[0], json={}, expect=403)
    assert r.json()["error"] in ("forbidden", "not_eligible")
    r = await api.call(
        "POST",
        f"/pki/signing-requests/{req['id']}/cancel",
        requester,
        json={"comment": "wrong build"},
        expect=200,
    )
    assert r.json()["status"] == "cancelled"
    await api.call("POST", f"/pki/signing-requests/{req['id']}/cancel", requester, json={}, expect=409)


async def test_deciding_an_unknown_request_checks_the_caller_first(api: Api) -> None:
    """The caller and the request are read together; the answers keep their order: scope (403)
    before the lookup (404)."""
    approver = await api.identity()
    requester = await api.identity(scopes=["codesign:request"])
    for decision in ("approve", "reject"):
        r = await api.call(
            "POST", f"/pki/signing-requests/no-such-id/{decision}", requester, json={}, expect=403
        )
        assert r.json()["error"] == "forbidden"
        r = await api.call(
            "POST", f"/pki/signing-requests/no-such-id/{decision}", approver, json={}, expect=404
        )
        assert r.json()["error"] == "not_found"
    await api.call("POST", "/pki/signing-requests/no-such-id/cancel", requester, json={}, expect=404)


async def test_admin_may_cancel(api: Api) -> None:
    requester, _first, _release, _policy, signer = await _setup_two_step(api)
    req = await api.open_request(requester, signer["id"])
    r = await api.call("POST", f"/pki/signing-requests/{req['id']}/cancel", api.admin, json={}, expect=200)
    assert r.json()["status"] == "cancelled"


async def test_short_ttl_expires_in_real_time(api: Api) -> None:
    requester = await api.identity()
    approver = await api.identity()
    policy = await api.policy([([approver], 1)], requestTtlSeconds=1)
    signer = await api.signer(members=[requester], policy_id=policy["id"])
    req = await api.open_request(requester, signer["id"])
    result = (
        await api.call(
            "GET", f"/pki/signing-requests/{req['id']}/result?waitSeconds=15", requester, expect=200
        )
    ).json()
    assert result["status"] == "expired"
    r = await api.call("POST", f"/pki/signing-requests/{req['id']}/approve", approver, json={}, expect=409)
    assert r.json()["error"] == "request_not_open"


async def test_concurrent_approvals_of_one_step_counted_once_each(api: Api) -> None:
    requester = await api.identity()
    first = [await api.identity() for _ in range(3)]
    second = [await api.identity() for _ in range(2)]
    policy = await api.policy([(first, 2), (second, 2)])
    signer = await api.signer(members=[requester], policy_id=policy["id"])
    req = await api.open_request(requester, signer["id"])
    # All three approvers of step 1 at the same moment: step 1 takes exactly two, and the third
    # must neither count towards step 2 nor be lost silently.
    results = await asyncio.gather(
        *(api.call("POST", f"/pki/signing-requests/{req['id']}/approve", a, json={}) for a in first)
    )
    codes = sorted(r.status_code for r in results)
    detail = (await api.call("GET", f"/pki/signing-requests/{req['id']}", requester, expect=200)).json()
    assert detail["steps"][0]["status"] == "completed"
    assert len(detail["steps"][0]["approvals"]) == 2
    assert detail["steps"][1]["approvals"] == []
    assert detail["steps"][1]["status"] == "in-progress"
    assert codes == [200, 200, 403]
    # The same approver twice at once in step 2 counts once.
    dup = await asyncio.gather(
        *(
            api.call("POST", f"/pki/signing-requests/{req['id']}/approve", second[0], json={})
            for _ in range(2)
        )
    )
    assert sorted(r.status_code for r in dup) == [200, 403]
    detail = (await api.call("GET", f"/pki/signing-requests/{req['id']}", requester, expect=200)).json()
    assert len(detail["steps"][1]["approvals"]) == 1
    assert detail["status"] == "open"


async def test_window_and_count_checked_against_policy(api: Api) -> None:
    requester = await api.identity()
    approver = await api.identity()
    policy = await api.policy([([approver], 1)], maxWindowSeconds=600, maxSignings=3)
    signer = await api.signer(members=[requester], policy_id=policy["id"])
    r = await api.call(
        "POST",
        "/pki/signing-requests",
        requester,
        json={"signerId": signer["id"], "allowedSignOperations": 4},
        expect=400,
    )
    assert r.json()["error"] == "policy_violation"
    r = await api.call(
        "POST",
        "/pki/signing-requests",
        requester,
        json={
            "signerId": signer["id"],
            "validFrom": "2030-01-01T00:00:00Z",
            "validUntil": "2030-01-01T01:00:00Z",
        },
        expect=400,
    )
    assert r.json()["error"] == "policy_violation"
    req = await api.open_request(requester, signer["id"])
    assert req["allowedSignOperations"] == 3
    listed = (
        await api.call("GET", f"/pki/signing-requests?signerId={signer['id']}", requester, expect=200)
    ).json()
    assert listed["total"] == 1


async def test_policy_snapshot_survives_later_edits(api: Api) -> None:
    requester = await api.identity()
    old_approver = await api.identity()
    new_approver = await api.identity()
    policy = await api.policy([([old_approver], 1)])
    signer = await api.signer(members=[requester], policy_id=policy["id"])
    req = await api.open_request(requester, signer["id"])
    await api.call(
        "PATCH",
        f"/pki/signing-policies/{policy['id']}",
        api.admin,
        json={"steps": [{"name": "new", "approverIds": [new_approver.id], "requiredApprovals": 1}]},
        expect=200,
    )
    await api.call("POST", f"/pki/signing-requests/{req['id']}/approve", new_approver, json={}, expect=403)
    r = await api.call(
        "POST", f"/pki/signing-requests/{req['id']}/approve", old_approver, json={}, expect=200
    )
    assert r.json()["status"] == "approved"
    # A policy in use cannot be deleted.
    r = await api.call("DELETE", f"/pki/signing-policies/{policy['id']}", api.admin, expect=409)


async def test_policy_validation(api: Api) -> None:
    a = await api.identity()
    base = {"name": "p-invalid", "steps": [{"name": "s", "approverIds": [a.id], "requiredApprovals": 2}]}
    r = await api.call("POST", "/pki/signing-policies", api.admin, json=base, expect=400)
    assert r.json()["error"] == "invalid_policy"
    base["steps"][0]["requiredApprovals"] = 0
    await api.call("POST", "/pki/signing-policies", api.admin, json=base, expect=400)
    base["steps"][0] = {"name": "s", "approverIds": ["no-such-id"], "requiredApprovals": 1}
    r = await api.call("POST", "/pki/signing-policies", api.admin, json=base, expect=400)
    assert r.json()["error"] == "unknown_identity"
    base["steps"][0] = {"name": "s", "approverIds": [a.id], "requiredApprovals": 1}
    base["maxSignings"] = 0
    await api.call("POST", "/pki/signing-policies", api.admin, json=base, expect=400)


async def test_workflow_search_attributes_and_state_query(api: Api, temporal_env) -> None:
    requester, _first, _release, _policy, signer = await _setup_two_step(api)
    req = await api.open_request(requester, signer["id"])
    handle = temporal_env.client.get_workflow_handle(req["workflowId"])
    from core.schemas import RequestState

    state = await handle.query("state", result_type=RequestState)
    assert state.id == req["id"]
    assert state.status == "open"

    async def listed() -> bool:
        found = [
            w
            async for w in temporal_env.client.list_workflows(
                f"SigningStatus = 'open' AND SignerName = '{signer['name']}'"
            )
        ]
        return len(found) == 1

    await assert_eventually(listed, timeout=15)
    await api.call("POST", f"/pki/signing-requests/{req['id']}/cancel", requester, json={}, expect=200)


async def test_audit_history_of_one_request_in_order(api: Api) -> None:
    requester = await api.identity()
    auditor = await api.identity(scopes=["audit:read"])
    a, b = await api.identity(), await api.identity()
    policy = await api.policy([([a], 1), ([b], 1)], maxSignings=5)
    signer = await api.signer(members=[requester], policy_id=policy["id"])
    req = await api.open_request(requester, signer["id"], allowedSignOperations=2)
    await api.call(
        "POST", f"/pki/signing-requests/{req['id']}/approve", a, json={"comment": "built by CI"}, expect=200
    )
    approved = await api.call("POST", f"/pki/signing-requests/{req['id']}/approve", b, json={}, expect=200)
    digest = base64.b64encode(hashlib.sha256(b"audited").digest()).decode()
    sign = {"data": digest, "signingAlgorithm": "ECDSA_SHA256", "isDigest": True}
    for _ in range(2):
        await api.call("POST", f"/pki/signers/{signer['id']}/sign", requester, json=sign, expect=200)
    await api.call("POST", f"/pki/signers/{signer['id']}/sign", requester, json=sign, expect=403)

    events = (await api.call("GET", f"/audit-events?requestId={req['id']}", auditor, expect=200)).json()[
        "items"
    ]
    actions = [e["action"] for e in events]
    assert actions == [
        "signing_request.opened",
        "signing_request.approval",
        "signing_request.step_completed",
        "signing_request.approval",
        "signing_request.step_completed",
        "grant.issued",
        "signing_request.approved",
        "signing_operation.success",
        "signing_operation.success",
    ]
    assert [e["actorId"] for e in events if e["action"] == "signing_request.approval"] == [a.id, b.id]
    assert events[1]["data"]["comment"] == "built by CI"
    assert events[5]["entityId"] == approved.json()["grantId"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    chain = (await api.call("GET", "/audit-events/verify", auditor, expect=200)).json()
    assert chain["valid"] is True
