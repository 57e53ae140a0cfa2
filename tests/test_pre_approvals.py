"""Pre-approvals through the public API: matching, single and multi use, release of waiting
requests, refusals, revocation, and a race for one single-use pre-approval."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from activities.requests import RequestActivities
from core.schemas import ClaimPreApprovalInput
from tests.conftest import CLIENT_IP, Api, Ident, assert_eventually

OTHER_IP = "198.51.100.23"


@dataclass
class Setup:
    requester: Ident
    approver: Ident
    signer: dict[str, Any]


async def _setup(api: Api) -> Setup:
    requester = await api.identity()
    approver = await api.identity()
    policy = await api.policy([([approver], 1)], maxSignings=5)
    signer = await api.signer(members=[requester], policy_id=policy["id"])
    return Setup(requester, approver, signer)


async def _pre_approve(api: Api, s: Setup, **extra: Any) -> dict[str, Any]:
    body = {"signerId": s.signer["id"], "identityId": s.requester.id, "comment": "nightly", **extra}
    r = await api.call("POST", "/pki/pre-approvals", s.approver, json=body, expect=201)
    return dict(r.json())


async def _pre_approval(api: Api, s: Setup, pre_approval_id: str) -> dict[str, Any]:
    r = await api.call("GET", f"/pki/pre-approvals/{pre_approval_id}", s.approver, expect=200)
    return dict(r.json())


async def _result(api: Api, who: Ident, request_id: str, wait: float) -> dict[str, Any]:
    r = await api.call(
        "GET", f"/pki/signing-requests/{request_id}/result?waitSeconds={wait}", who, expect=200
    )
    return dict(r.json())


async def _approved_by(api: Api, s: Setup, request_id: str, pre_approval_id: str) -> dict[str, Any]:
    """The request was approved by that pre-approval: every step skipped, a grant issued."""
    req = await _result(api, s.requester, request_id, 10)
    assert req["status"] == "approved", req
    assert req["preApprovalId"] == pre_approval_id
    assert req["steps"] and all(step["status"] == "skipped" for step in req["steps"])
    assert all(step["approvals"] == [] for step in req["steps"])
    assert req["currentStep"] is None
    assert req["grantId"]
    grant = (await api.call("GET", f"/pki/grants/{req['grantId']}", s.requester, expect=200)).json()
    assert grant["requestId"] == request_id
    assert grant["identityId"] == s.requester.id
    assert grant["status"] == "active"
    return req


async def _stays_open(api: Api, s: Setup, request_id: str) -> None:
    """Still open a while after its workflow had the chance to claim a pre-approval."""
    req = await _result(api, s.requester, request_id, 1.5)
    assert req["status"] == "open", req
    assert req["preApprovalId"] is None
    assert req["grantId"] is None
    assert req["steps"][0]["status"] == "in-progress"


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_single_use_serves_one_request_and_the_next_stays_open(api: Api) -> None:
    s = await _setup(api)
    pre = await _pre_approve(api, s, singleUse=True, comment="release 2.0 pipeline")
    assert pre["status"] == "active"
    assert pre["singleUse"] is True
    assert pre["signerId"] == s.signer["id"]
    assert pre["identityId"] == s.requester.id
    assert pre["createdBy"] == s.approver.id
    assert pre["usedCount"] == 0
    created = datetime.fromisoformat(pre["notBefore"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(pre["expiresAt"].replace("Z", "+00:00"))
    assert expires - created == timedelta(hours=24)

    first = await api.open_request(s.requester, s.signer["id"], justification="nightly build")
    req = await _approved_by(api, s, first["id"], pre["id"])
    # The grant signs at once, no approver involved.
    sign = {"data": "YWJj", "signingAlgorithm": "ECDSA_SHA256"}
    r = await api.call("POST", f"/pki/signers/{s.signer['id']}/sign", s.requester, json=sign, expect=200)
    assert r.json()["grantId"] == req["grantId"]

    used = await _pre_approval(api, s, pre["id"])
    assert used["status"] == "used"
    assert used["usedCount"] == 1
    assert used["lastUsedRequestId"] == first["id"]

    second = await api.open_request(s.requester, s.signer["id"])
    await _stays_open(api, s, second["id"])
    # It still takes the normal route.
    r = await api.call(
        "POST", f"/pki/signing-requests/{second['id']}/approve", s.approver, json={}, expect=200
    )
    assert r.json()["status"] == "approved"
    assert r.json()["preApprovalId"] is None

    events = (await api.call("GET", f"/audit-events?requestId={first['id']}", api.admin, expect=200)).json()[
        "items"
    ]
    actions = [e["action"] for e in events]
    assert "pre_approval.used" in actions
    assert "signing_request.steps_skipped" in actions
    skipped = next(e for e in events if e["action"] == "signing_request.steps_skipped")
    assert skipped["data"]["preApprovalId"] == pre["id"]


async def test_multi_use_serves_several_until_it_expires(api: Api) -> None:
    s = await _setup(api)
    pre = await _pre_approve(api, s, hours=0.001)  # 3.6 s
    for _ in range(3):
        req = await api.open_request(s.requester, s.signer["id"])
        await _approved_by(api, s, req["id"], pre["id"])
    after = await _pre_approval(api, s, pre["id"])
    assert after["status"] == "active"
    assert after["usedCount"] == 3

    async def expired() -> bool:
        return bool((await _pre_approval(api, s, pre["id"]))["status"] == "expired")

    await assert_eventually(expired, timeout=10, interval=0.2)
    late = await api.open_request(s.requester, s.signer["id"])
    await _stays_open(api, s, late["id"])
    assert (await _pre_approval(api, s, pre["id"]))["usedCount"] == 3


async def test_not_before_in_the_future_does_not_match_yet(api: Api) -> None:
    s = await _setup(api)
    not_before = datetime.now(UTC) + timedelta(hours=1)
    pre = await _pre_approve(api, s, notBefore=_rfc3339(not_before), hours=2)
    assert pre["notBefore"] == _rfc3339(not_before)
    assert pre["expiresAt"] == _rfc3339(not_before + timedelta(hours=2))
    req = await api.open_request(s.requester, s.signer["id"])
    await _stays_open(api, s, req["id"])
    assert (await _pre_approval(api, s, pre["id"]))["usedCount"] == 0


async def test_not_before_in_the_past_matches(api: Api) -> None:
    s = await _setup(api)
    not_before = datetime.now(UTC) - timedelta(minutes=30)
    pre = await _pre_approve(api, s, notBefore=_rfc3339(not_before), hours=1)
    req = await api.open_request(s.requester, s.signer["id"])
    await _approved_by(api, s, req["id"], pre["id"])


async def test_ip_address_is_the_one_the_api_saw(api: Api) -> None:
    s = await _setup(api)
    elsewhere = await _pre_approve(api, s, ipAddress=OTHER_IP, singleUse=True)
    # A client cannot claim to come from the pre-approved address.
    r = await api.call(
        "POST",
        "/pki/signing-requests",
        headers={**s.requester.headers, "X-Forwarded-For": OTHER_IP, "X-Real-IP": OTHER_IP},
        json={"signerId": s.signer["id"], "clientMetadata": {"ipAddress": OTHER_IP}},
        expect=201,
    )
    waiting = r.json()
    await _stays_open(api, s, waiting["id"])
    assert (await _pre_approval(api, s, elsewhere["id"]))["usedCount"] == 0

    # The same identity and signer from the address the API sees: released at once.
    here = await _pre_approve(api, s, ipAddress=CLIENT_IP, singleUse=True)
    assert here["ipAddress"] == CLIENT_IP
    await _approved_by(api, s, waiting["id"], here["id"])
    assert (await _pre_approval(api, s, elsewhere["id"]))["status"] == "active"


async def test_signing_executable_must_equal_the_client_metadata(api: Api) -> None:
    s = await _setup(api)
    tool = "/usr/bin/osslsigncode"
    pre = await _pre_approve(api, s, signingExecutable=tool)
    assert pre["signingExecutable"] == tool
    other = await api.open_request(
        s.requester, s.signer["id"], clientMetadata={"signingExecutable": "/usr/bin/signtool"}
    )
    unnamed = await api.open_request(s.requester, s.signer["id"])
    await _stays_open(api, s, other["id"])
    await _stays_open(api, s, unnamed["id"])
    same = await api.open_request(s.requester, s.signer["id"], clientMetadata={"signingExecutable": tool})
    await _approved_by(api, s, same["id"], pre["id"])
    assert (await _pre_approval(api, s, pre["id"]))["usedCount"] == 1


async def test_only_the_pre_approved_identity_and_signer_match(api: Api) -> None:
    s = await _setup(api)
    colleague = await api.identity()
    other_signer = await api.signer(members=[s.requester, colleague], policy_id=s.signer["signingPolicyId"])
    await api.call(
        "PUT",
        f"/pki/signers/{s.signer['id']}/members",
        api.admin,
        json={"identityIds": [s.requester.id, colleague.id]},
        expect=200,
    )
    pre = await _pre_approve(api, s)
    by_colleague = await api.open_request(colleague, s.signer["id"])
    on_other_signer = await api.open_request(s.requester, other_signer["id"])
    for req, who in ((by_colleague, colleague), (on_other_signer, s.requester)):
        result = await _result(api, who, req["id"], 1.5)
        assert result["status"] == "open"
        assert result["preApprovalId"] is None
    assert (await _pre_approval(api, s, pre["id"]))["usedCount"] == 0


async def test_a_waiting_request_is_released_by_a_later_pre_approval(api: Api) -> None:
    s = await _setup(api)
    req = await api.open_request(s.requester, s.signer["id"])
    await _stays_open(api, s, req["id"])
    pre = await _pre_approve(api, s, singleUse=True)

    async def approved() -> bool:
        r = await api.call("GET", f"/pki/signing-requests/{req['id']}", s.requester, expect=200)
        return bool(r.json()["status"] == "approved")

    await assert_eventually(approved)
    await _approved_by(api, s, req["id"], pre["id"])
    assert (await _pre_approval(api, s, pre["id"]))["status"] == "used"


async def test_a_waiting_request_is_released_when_a_later_pre_approval_starts(api: Api) -> None:
    s = await _setup(api)
    req = await api.open_request(s.requester, s.signer["id"])
    starts = (datetime.now(UTC) + timedelta(seconds=3)).replace(microsecond=0)
    pre = await _pre_approve(api, s, singleUse=True, notBefore=_rfc3339(starts))
    await _stays_open(api, s, req["id"])
    assert datetime.now(UTC) < starts

    async def approved() -> bool:
        r = await api.call("GET", f"/pki/signing-requests/{req['id']}", s.requester, expect=200)
        return bool(r.json()["status"] == "approved")

    await assert_eventually(approved, timeout=15)
    assert datetime.now(UTC) >= starts
    await _approved_by(api, s, req["id"], pre["id"])


async def test_a_single_use_pre_approval_releases_one_of_several_waiting(api: Api) -> None:
    s = await _setup(api)
    waiting = [await api.open_request(s.requester, s.signer["id"]) for _ in range(3)]
    for req in waiting:
        await _stays_open(api, s, req["id"])
    pre = await _pre_approve(api, s, singleUse=True)

    async def one_used() -> bool:
        return bool((await _pre_approval(api, s, pre["id"]))["status"] == "used")

    await assert_eventually(one_used)
    results = [await _result(api, s.requester, req["id"], 1.5) for req in waiting]
    assert sorted(r["status"] for r in results) == ["approved", "open", "open"]
    winner = next(r for r in results if r["status"] == "approved")
    assert winner["preApprovalId"] == pre["id"]


async def test_who_may_pre_approve(api: Api) -> None:
    s = await _setup(api)
    body = {"signerId": s.signer["id"], "identityId": s.requester.id, "comment": "ok"}

    # Nobody pre-approves themself, not even an approver of the policy.
    approver_requester = await api.identity()
    policy = await api.policy([([approver_requester, s.approver], 1)])
    own_signer = await api.signer(members=[approver_requester], policy_id=policy["id"])
    r = await api.call(
        "POST",
        "/pki/pre-approvals",
        approver_requester,
        json={"signerId": own_signer["id"], "identityId": approver_requester.id, "comment": "me"},
        expect=403,
    )
    assert r.json()["error"] == "forbidden"

    # codesign:approve alone is not enough: a place among the signer policy's approvers is.
    outsider = await api.identity()
    r = await api.call("POST", "/pki/pre-approvals", outsider, json=body, expect=403)
    assert set(r.json()) == {"error", "error_description"}
    # Nor is admin.
    await api.call("POST", "/pki/pre-approvals", api.admin, json=body, expect=403)
    # An approver whose token lacks codesign:approve is refused.
    no_scope = await api.call(
        "POST",
        f"/identities/{s.approver.id}/tokens",
        api.admin,
        json={"scopes": ["codesign:request"]},
        expect=201,
    )
    await api.call(
        "POST",
        "/pki/pre-approvals",
        headers={"Authorization": f"Bearer {no_scope.json()['token']}"},
        json=body,
        expect=403,
    )
    # A signer without a policy has no approvers.
    plain = await api.signer(members=[s.requester])
    await api.call(
        "POST", "/pki/pre-approvals", s.approver, json={**body, "signerId": plain["id"]}, expect=403
    )
    await api.call("POST", "/pki/pre-approvals", json=body, expect=401)

    # Bad input is 400, unknown signer 404.
    for bad in (
        {k: v for k, v in body.items() if k != "comment"},
        {**body, "comment": ""},
        {**body, "hours": 0},
        {**body, "hours": "soon"},
        {**body, "ipAddress": "not-an-address"},
        {**body, "notBefore": "tomorrow"},
        {**body, "identityId": "no-such-identity"},
    ):
        r = await api.call("POST", "/pki/pre-approvals", s.approver, json=bad, expect=400)
        assert set(r.json()) == {"error", "error_description"}
    await api.call("POST", "/pki/pre-approvals", s.approver, json={**body, "signerId": "nope"}, expect=404)

    # None of the refusals left a pre-approval behind.
    listed = (
        await api.call("GET", f"/pki/pre-approvals?signerId={s.signer['id']}", s.approver, expect=200)
    ).json()
    assert listed["total"] == 0


async def test_revoked_pre_approval_no_longer_matches_and_lists_by_signer(api: Api) -> None:
    s = await _setup(api)
    other = await _setup(api)
    pre = await _pre_approve(api, s)
    unrelated = await _pre_approve(api, other)

    listed = (
        await api.call("GET", f"/pki/pre-approvals?signerId={s.signer['id']}", s.approver, expect=200)
    ).json()
    assert listed["total"] == 1
    assert [p["id"] for p in listed["items"]] == [pre["id"]]
    assert unrelated["id"] not in {p["id"] for p in listed["items"]}

    # The requester sees it but may not revoke it.
    await api.call("GET", f"/pki/pre-approvals/{pre['id']}", s.requester, expect=200)
    await api.call("DELETE", f"/pki/pre-approvals/{pre['id']}", s.requester, expect=403)
    await api.call("DELETE", f"/pki/pre-approvals/{pre['id']}", other.approver, expect=403)

    await api.call("DELETE", f"/pki/pre-approvals/{pre['id']}", s.approver, expect=204)
    assert (await _pre_approval(api, s, pre["id"]))["status"] == "revoked"
    r = await api.call("DELETE", f"/pki/pre-approvals/{pre['id']}", s.approver, expect=409)
    assert r.json()["error"] == "pre_approval_not_active"
    await api.call("DELETE", "/pki/pre-approvals/no-such-id", s.approver, expect=404)
    await api.call("GET", "/pki/pre-approvals/no-such-id", s.approver, expect=404)

    req = await api.open_request(s.requester, s.signer["id"])
    await _stays_open(api, s, req["id"])
    listed = (
        await api.call("GET", f"/pki/pre-approvals?signerId={s.signer['id']}", s.approver, expect=200)
    ).json()
    assert listed["items"][0]["status"] == "revoked"
    assert listed["items"][0]["usedCount"] == 0

    events = (await api.call("GET", f"/audit-events?entityId={pre['id']}", api.admin, expect=200)).json()[
        "items"
    ]
    assert [e["action"] for e in events] == ["pre_approval.created", "pre_approval.revoked"]
    assert events[1]["actorId"] == s.approver.id


async def test_concurrent_requests_race_for_one_single_use_pre_approval(api: Api) -> None:
    for _ in range(3):
        s = await _setup(api)
        pre = await _pre_approve(api, s, singleUse=True)
        racing = await asyncio.gather(*(api.open_request(s.requester, s.signer["id"]) for _ in range(2)))
        results = await asyncio.gather(*(_result(api, s.requester, req["id"], 2) for req in racing))
        assert sorted(r["status"] for r in results) == ["approved", "open"], results
        winner = next(r for r in results if r["status"] == "approved")
        loser = next(r for r in results if r["status"] == "open")
        assert winner["preApprovalId"] == pre["id"]
        assert loser["preApprovalId"] is None
        assert loser["steps"][0]["status"] == "in-progress"
        after = await _pre_approval(api, s, pre["id"])
        assert after["status"] == "used"
        assert after["usedCount"] == 1
        assert after["lastUsedRequestId"] == winner["id"]
        grants = (
            await api.call("GET", f"/pki/grants?signerId={s.signer['id']}", api.admin, expect=200)
        ).json()
        assert [g["requestId"] for g in grants["items"]] == [winner["id"]]


async def test_a_retried_claim_counts_once(api: Api, engine: Engine) -> None:
    """Temporal retries an activity whose answer was lost: the second attempt returns the first
    attempt's claim instead of spending another use."""
    s = await _setup(api)
    pre = await _pre_approve(api, s)
    activities = RequestActivities(engine, key_store=None)
    claim = ClaimPreApprovalInput(
        request_id=str(uuid.uuid4()),
        signer_id=s.signer["id"],
        identity_id=s.requester.id,
        ip_address=CLIENT_IP,
    )
    assert await asyncio.to_thread(activities.claim_pre_approval, claim) == pre["id"]
    assert await asyncio.to_thread(activities.claim_pre_approval, claim) == pre["id"]
    assert (await _pre_approval(api, s, pre["id"]))["usedCount"] == 1
    other = claim.model_copy(update={"request_id": str(uuid.uuid4())})
    assert await asyncio.to_thread(activities.claim_pre_approval, other) == pre["id"]
    assert (await _pre_approval(api, s, pre["id"]))["usedCount"] == 2


async def test_a_claim_the_request_could_not_use_is_given_back(api: Api, engine: Engine) -> None:
    """A request decided while its claim ran releases the claim: the single-use pre-approval
    is active again for the next request, and a retried release changes nothing."""
    from core.schemas import ReleasePreApprovalInput

    s = await _setup(api)
    pre = await _pre_approve(api, s, singleUse=True)
    activities = RequestActivities(engine, key_store=None)
    claim = ClaimPreApprovalInput(
        request_id=str(uuid.uuid4()),
        signer_id=s.signer["id"],
        identity_id=s.requester.id,
        ip_address=CLIENT_IP,
    )
    assert await asyncio.to_thread(activities.claim_pre_approval, claim) == pre["id"]
    assert (await _pre_approval(api, s, pre["id"]))["status"] == "used"
    release = ReleasePreApprovalInput(pre_approval_id=pre["id"], request_id=claim.request_id)
    await asyncio.to_thread(activities.release_pre_approval, release)
    await asyncio.to_thread(activities.release_pre_approval, release)
    after = await _pre_approval(api, s, pre["id"])
    assert after["status"] == "active"
    assert after["usedCount"] == 0
    nxt = await api.open_request(s.requester, s.signer["id"])
    await _approved_by(api, s, nxt["id"], pre["id"])


async def test_an_ipv4_mapped_address_matches_its_ipv4_form(api: Api, engine: Engine) -> None:
    s = await _setup(api)
    pre = await _pre_approve(api, s, ipAddress="::ffff:192.0.2.10")
    assert pre["ipAddress"] == "192.0.2.10"
    activities = RequestActivities(engine, key_store=None)

    def claim(address: str | None) -> str | None:
        return activities.claim_pre_approval(
            ClaimPreApprovalInput(
                request_id=str(uuid.uuid4()),
                signer_id=s.signer["id"],
                identity_id=s.requester.id,
                ip_address=address,
            )
        )

    assert await asyncio.to_thread(claim, None) is None
    assert await asyncio.to_thread(claim, "192.0.2.11") is None
    assert await asyncio.to_thread(claim, "::ffff:192.0.2.10") == pre["id"]
    assert await asyncio.to_thread(claim, "192.0.2.10") == pre["id"]


async def test_a_pre_approval_made_right_after_the_opening_claim_missed_it_releases_the_request(
    api: Api, engine: Engine, monkeypatch: Any
) -> None:
    """The opening write and the opening claim run as one activity, in two transactions: the
    request is committed before the claim reads pre-approvals. So a pre-approval committed just
    after that read (here: made from inside the activity, after the claim's transaction and
    before the activity's answer) lists the request among the waiting ones and releases it by
    signal."""
    import activities.requests as request_activities

    s = await _setup(api)
    # One that does not match (another address) makes the workflow claim at once.
    await _pre_approve(api, s, ipAddress=OTHER_IP)
    loop = asyncio.get_running_loop()
    made: dict[str, Any] = {}
    claim = request_activities._claim_pre_approval

    def claim_then_pre_approve(session: Any, input: ClaimPreApprovalInput) -> str | None:
        claimed = claim(session, input)
        if input.identity_id == s.requester.id and not made:
            assert claimed is None
            if session.get_bind().dialect.name == "sqlite":
                # SQLite's write lock would hold the API back; on PostgreSQL the claim's
                # transaction stays open, so only a request committed before it is seen.
                session.commit()
            made.update(
                asyncio.run_coroutine_threadsafe(_pre_approve(api, s, singleUse=True), loop).result(10)
            )
        return claimed

    monkeypatch.setattr(request_activities, "_claim_pre_approval", claim_then_pre_approve)
    req = await api.open_request(s.requester, s.signer["id"])

    async def approved() -> bool:
        r = await api.call("GET", f"/pki/signing-requests/{req['id']}", s.requester, expect=200)
        return bool(r.json()["status"] == "approved")

    await assert_eventually(approved)
    assert made
    await _approved_by(api, s, req["id"], made["id"])
    assert (await _pre_approval(api, s, made["id"]))["status"] == "used"


async def test_a_retried_opening_writes_once_and_claims_once(api: Api, engine: Engine) -> None:
    """The opening activity retried after its answer was lost (both transactions committed):
    one opening event, the same claim, one use counted."""
    from sqlalchemy import select

    from core.schemas import AuditNote, OpenRequestInput, PersistRequestInput
    from store.db import session_scope
    from store.models import AuditEvent
    from tests.test_workflow_durability import _input

    s = await _setup(api)
    pre = await _pre_approve(api, s)
    activities = RequestActivities(engine, key_store=None)
    state = _input(timedelta(hours=1), [s.approver.id], requester_id=s.requester.id).request
    state = state.model_copy(update={"signer_id": s.signer["id"], "ip_address": CLIENT_IP, "version": 1})
    opening = OpenRequestInput(
        persist=PersistRequestInput(state=state, notes=[AuditNote(action="signing_request.opened")]),
        claim=ClaimPreApprovalInput(
            request_id=state.id, signer_id=s.signer["id"], identity_id=s.requester.id, ip_address=CLIENT_IP
        ),
    )
    assert await asyncio.to_thread(activities.open_request, opening) == pre["id"]
    assert await asyncio.to_thread(activities.open_request, opening) == pre["id"]
    assert (await _pre_approval(api, s, pre["id"]))["usedCount"] == 1
    with session_scope(engine) as session:
        actions = list(
            session.execute(
                select(AuditEvent.action)  # type: ignore[call-overload]
                .where(AuditEvent.request_id == state.id)
                .order_by(AuditEvent.seq)
            ).scalars()
        )
    assert actions == ["signing_request.opened", "pre_approval.used"]


async def test_a_pre_approval_made_while_the_api_opens_a_request_releases_it(
    api: Api, engine: Engine, monkeypatch: Any
) -> None:
    """With no pre-approval in sight when the request is built, its workflow does not claim at
    once. One made after that look but before the request's row is committed (so the
    pre-approval's own search for waiting requests cannot see it) is found by the API's second
    look, after the row is committed, and released by signal."""
    import activities.requests as request_activities

    s = await _setup(api)
    loop = asyncio.get_running_loop()
    made: dict[str, Any] = {}
    persist = request_activities.persist_request_state

    def pre_approve_then_persist(engine: Any, input: Any) -> bool:
        if input.state.requester_id == s.requester.id and input.state.version == 0 and not made:
            made.update(
                asyncio.run_coroutine_threadsafe(_pre_approve(api, s, singleUse=True), loop).result(10)
            )
        return persist(engine, input)

    monkeypatch.setattr(request_activities, "persist_request_state", pre_approve_then_persist)
    req = await api.open_request(s.requester, s.signer["id"])
    assert made

    async def approved() -> bool:
        r = await api.call("GET", f"/pki/signing-requests/{req['id']}", s.requester, expect=200)
        return bool(r.json()["status"] == "approved")

    await assert_eventually(approved)
    await _approved_by(api, s, req["id"], made["id"])
