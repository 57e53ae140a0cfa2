"""Grants through the public API: machine bypass, windows, revocation, exhaustion, ownership,
exact expiry, a failed signature that gives its operation back, list filters and visibility."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, update
from sqlmodel import Session

from store.models import Certificate
from tests.conftest import Api, Ident

SIGN_BODY = {
    "data": base64.b64encode(hashlib.sha256(b"grant test artifact").digest()).decode(),
    "signingAlgorithm": "ECDSA_SHA256",
    "isDigest": True,
}
REQUESTER_SCOPES = ["codesign:request", "codesign:sign"]


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def approved_grant(
    api: Api, requester: Ident, approver: Ident, signer: dict[str, Any], **body: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Open a request, approve it, and return the approved request and its grant."""
    req = await api.open_request(requester, signer["id"], **body)
    r = await api.call("POST", f"/pki/signing-requests/{req['id']}/approve", approver, json={}, expect=200)
    approved = r.json()
    assert approved["status"] == "approved", approved
    assert approved["grantId"]
    grant = (await api.call("GET", f"/pki/grants/{approved['grantId']}", requester, expect=200)).json()
    return approved, grant


async def sign(api: Api, who: Ident, signer: dict[str, Any]) -> Any:
    return await api.call("POST", f"/pki/signers/{signer['id']}/sign", who, json=SIGN_BODY)


async def operations(api: Api, signer: dict[str, Any]) -> list[dict[str, Any]]:
    r = await api.call("GET", f"/pki/signers/{signer['id']}/operations?limit=500", api.admin, expect=200)
    return list(r.json()["items"])


async def grant_of(api: Api, grant_id: str) -> dict[str, Any]:
    return dict((await api.call("GET", f"/pki/grants/{grant_id}", api.admin, expect=200)).json())


async def assert_refused(api: Api, who: Ident, signer: dict[str, Any]) -> dict[str, Any]:
    """The call is refused with approval_required and recorded as denied for that caller."""
    before = {op["id"] for op in await operations(api, signer)}
    r = await sign(api, who, signer)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "approval_required"
    new = [op for op in await operations(api, signer) if op["id"] not in before]
    assert len(new) == 1, new
    assert new[0]["status"] == "denied"
    assert new[0]["actorId"] == who.id
    assert new[0]["error"]
    return new[0]


# --------------------------------------------------------------------------- machine bypass


async def test_machine_bypass_approves_at_once_within_ceilings(api: Api) -> None:
    machine = await api.identity(kind="machine", scopes=REQUESTER_SCOPES)
    approver = await api.identity()
    policy = await api.policy([([approver], 1)], allowMachineBypass=True, maxWindowSeconds=600, maxSignings=3)
    signer = await api.signer(members=[machine], policy_id=policy["id"])

    req = await api.open_request(machine, signer["id"], justification="nightly build")
    result = (
        await api.call("GET", f"/pki/signing-requests/{req['id']}/result?waitSeconds=10", machine, expect=200)
    ).json()
    assert result["status"] == "approved"
    assert [s["status"] for s in result["steps"]] == ["skipped"]
    assert result["steps"][0]["approvals"] == []
    assert result["bypass"] == "machine"
    grant = (await api.call("GET", f"/pki/grants/{result['grantId']}", machine, expect=200)).json()
    assert grant["identityId"] == machine.id
    assert grant["signerId"] == signer["id"]
    assert grant["requestId"] == req["id"]
    assert grant["status"] == "active"
    # Defaults are the policy's ceilings, never more.
    assert grant["allowedSignOperations"] == 3
    window = parse_time(grant["validUntil"]) - parse_time(grant["validFrom"])
    assert window == timedelta(seconds=600)

    r = await sign(api, machine, signer)
    assert r.status_code == 200, r.text
    assert r.json()["grantId"] == grant["id"]

    # Bypass does not lift the ceilings: asking for more is still a policy violation.
    r = await api.call(
        "POST",
        "/pki/signing-requests",
        machine,
        json={"signerId": signer["id"], "allowedSignOperations": 4},
        expect=400,
    )
    assert r.json()["error"] == "policy_violation"
    until = rfc3339(datetime.now(UTC) + timedelta(seconds=3600))
    r = await api.call(
        "POST",
        "/pki/signing-requests",
        machine,
        json={"signerId": signer["id"], "validUntil": until},
        expect=400,
    )
    assert r.json()["error"] == "policy_violation"


async def test_user_under_bypass_policy_and_machine_without_bypass_stay_open(api: Api) -> None:
    user = await api.identity(scopes=REQUESTER_SCOPES)
    machine = await api.identity(kind="machine", scopes=REQUESTER_SCOPES)
    approver = await api.identity()
    bypass = await api.policy([([approver], 1)], allowMachineBypass=True)
    strict = await api.policy([([approver], 1)])
    bypass_signer = await api.signer(members=[user, machine], policy_id=bypass["id"])
    strict_signer = await api.signer(members=[machine], policy_id=strict["id"])

    pending = [
        (user, await api.open_request(user, bypass_signer["id"])),
        (machine, await api.open_request(machine, strict_signer["id"])),
    ]
    for who, req in pending:
        result = (
            await api.call("GET", f"/pki/signing-requests/{req['id']}/result?waitSeconds=1", who, expect=200)
        ).json()
        assert result["status"] == "open"
        assert result["grantId"] is None
        assert [s["status"] for s in result["steps"]] == ["in-progress"]
        assert result["bypass"] is None
    r = await api.call("GET", f"/pki/grants?identityId={user.id}", api.admin, expect=200)
    assert r.json()["total"] == 0
    r = await api.call("GET", f"/pki/grants?signerId={strict_signer['id']}", api.admin, expect=200)
    assert r.json()["total"] == 0
    await assert_refused(api, user, bypass_signer)
    await assert_refused(api, machine, strict_signer)


# ------------------------------------------------------------------- refusals, each recorded


async def _policy_signer(api: Api, members: list[Ident], **policy: Any) -> tuple[Ident, dict[str, Any]]:
    approver = await api.identity()
    created = await api.policy([([approver], 1)], **policy)
    return approver, await api.signer(members=members, policy_id=created["id"])


async def test_sign_before_the_window_opens_is_denied(api: Api) -> None:
    requester = await api.identity(scopes=REQUESTER_SCOPES)
    approver, signer = await _policy_signer(api, [requester], maxWindowSeconds=7200)
    now = datetime.now(UTC)
    _, grant = await approved_grant(
        api,
        requester,
        approver,
        signer,
        validFrom=rfc3339(now + timedelta(hours=1)),
        validUntil=rfc3339(now + timedelta(hours=2)),
    )
    assert parse_time(grant["validFrom"]) > datetime.now(UTC)
    assert grant["status"] == "active"
    await assert_refused(api, requester, signer)
    grant = await grant_of(api, grant["id"])
    assert grant["usedSignOperations"] == 0


async def test_revocation_takes_effect_on_the_next_call(api: Api) -> None:
    requester = await api.identity(scopes=REQUESTER_SCOPES)
    approver, signer = await _policy_signer(api, [requester])
    _, grant = await approved_grant(api, requester, approver, signer, allowedSignOperations=3)
    assert (await sign(api, requester, signer)).status_code == 200

    # Neither an empty reason nor a stranger without the approve scope can revoke.
    stranger = await api.identity(scopes=REQUESTER_SCOPES)
    await api.call("POST", f"/pki/grants/{grant['id']}/revoke", approver, json={"reason": ""}, expect=400)
    await api.call(
        "POST", f"/pki/grants/{grant['id']}/revoke", stranger, json={"reason": "mine now"}, expect=403
    )
    r = await api.call(
        "POST",
        f"/pki/grants/{grant['id']}/revoke",
        approver,
        json={"reason": "build server compromised"},
        expect=200,
    )
    assert r.json()["status"] == "revoked"
    assert r.json()["revokeReason"] == "build server compromised"

    await assert_refused(api, requester, signer)
    grant = await grant_of(api, grant["id"])
    assert grant["status"] == "revoked"
    assert grant["usedSignOperations"] == 1
    r = await api.call(
        "POST", f"/pki/grants/{grant['id']}/revoke", approver, json={"reason": "again"}, expect=409
    )
    assert r.json()["error"] == "grant_not_active"
    await api.call("POST", "/pki/grants/no-such-grant/revoke", approver, json={"reason": "x"}, expect=404)


async def test_holder_may_give_up_their_own_grant(api: Api) -> None:
    requester = await api.identity(scopes=REQUESTER_SCOPES)
    approver, signer = await _policy_signer(api, [requester])
    _, grant = await approved_grant(api, requester, approver, signer)
    r = await api.call(
        "POST", f"/pki/grants/{grant['id']}/revoke", requester, json={"reason": "not needed"}, expect=200
    )
    assert r.json()["status"] == "revoked"
    await assert_refused(api, requester, signer)


async def test_exhausted_grant_is_denied(api: Api) -> None:
    requester = await api.identity(scopes=REQUESTER_SCOPES)
    approver, signer = await _policy_signer(api, [requester])
    _, grant = await approved_grant(api, requester, approver, signer, allowedSignOperations=2)
    for _ in range(2):
        r = await sign(api, requester, signer)
        assert r.status_code == 200, r.text
        assert r.json()["grantId"] == grant["id"]
    await assert_refused(api, requester, signer)
    grant = await grant_of(api, grant["id"])
    assert grant["usedSignOperations"] == 2
    assert grant["status"] == "exhausted"
    ops = await operations(api, signer)
    assert sorted(op["status"] for op in ops) == ["denied", "success", "success"]
    assert all(op["grantId"] == grant["id"] for op in ops if op["status"] == "success")
    assert all(op["requestId"] == grant["requestId"] for op in ops if op["status"] == "success")


async def test_another_identitys_grant_is_not_usable(api: Api) -> None:
    holder = await api.identity(scopes=REQUESTER_SCOPES)
    colleague = await api.identity(scopes=REQUESTER_SCOPES)
    approver, signer = await _policy_signer(api, [holder, colleague])
    _, grant = await approved_grant(api, holder, approver, signer, allowedSignOperations=2)
    denied = await assert_refused(api, colleague, signer)
    assert denied["actorId"] == colleague.id
    grant = await grant_of(api, grant["id"])
    assert grant["usedSignOperations"] == 0
    assert grant["status"] == "active"
    # The holder still has both operations.
    assert (await sign(api, holder, signer)).status_code == 200


async def test_expiry_is_exact_at_the_call_without_a_sweep(api: Api) -> None:
    requester = await api.identity(scopes=REQUESTER_SCOPES)
    approver, signer = await _policy_signer(api, [requester])
    until = datetime.now(UTC) + timedelta(seconds=3)
    _, grant = await approved_grant(
        api, requester, approver, signer, validUntil=rfc3339(until), allowedSignOperations=10
    )
    assert abs((parse_time(grant["validUntil"]) - until).total_seconds()) < 1
    r = await sign(api, requester, signer)
    assert r.status_code == 200, r.text

    remaining = (parse_time(grant["validUntil"]) - datetime.now(UTC)).total_seconds()
    assert remaining > 0, "the approval took longer than the window"
    await asyncio.sleep(remaining + 0.05)
    await assert_refused(api, requester, signer)
    grant = await grant_of(api, grant["id"])
    assert grant["status"] == "expired"
    assert grant["usedSignOperations"] == 1
    expired = (await api.call("GET", f"/pki/grants?signerId={signer['id']}&status=expired", api.admin)).json()
    assert [g["id"] for g in expired["items"]] == [grant["id"]]
    active = (await api.call("GET", f"/pki/grants?signerId={signer['id']}&status=active", api.admin)).json()
    assert active["total"] == 0


async def test_failed_signature_does_not_consume_an_operation(api: Api, engine: Engine) -> None:
    """A key that cannot be opened (its sealed form damaged in the database, no mocks) fails the
    signature; the grant keeps its operation and the attempt is recorded as failed."""
    requester = await api.identity(scopes=REQUESTER_SCOPES)
    approver, signer = await _policy_signer(api, [requester])
    _, grant = await approved_grant(api, requester, approver, signer, allowedSignOperations=1)
    with Session(engine) as session:
        row = session.get(Certificate, signer["certificateId"])
        assert row is not None
        sealed = bytes(row.sealed_key)
        damaged = sealed[:-1] + bytes([sealed[-1] ^ 0x01])
        session.execute(
            update(Certificate).where(Certificate.id == signer["certificateId"]).values(sealed_key=damaged)
        )
        session.commit()
    try:
        r = await sign(api, requester, signer)
        assert r.status_code == 500, r.text
        assert r.json()["error"] == "signing_failed"
    finally:
        with Session(engine) as session:
            session.execute(
                update(Certificate).where(Certificate.id == signer["certificateId"]).values(sealed_key=sealed)
            )
            session.commit()
    after = await grant_of(api, grant["id"])
    assert after["usedSignOperations"] == 0
    assert after["status"] == "active"
    ops = await operations(api, signer)
    assert [(op["status"], op["actorId"], op["grantId"]) for op in ops] == [("failed", requester.id, None)]

    # The operation is still there for the signature that works.
    r = await sign(api, requester, signer)
    assert r.status_code == 200, r.text
    after = await grant_of(api, grant["id"])
    assert (after["usedSignOperations"], after["status"]) == (1, "exhausted")


# ------------------------------------------------------------------------ listing and visibility


async def test_grant_list_filters_and_requester_visibility(api: Api) -> None:
    alice = await api.identity(scopes=REQUESTER_SCOPES)
    bob = await api.identity(scopes=REQUESTER_SCOPES)
    approver = await api.identity()
    policy = await api.policy([([approver], 1)])
    first = await api.signer(members=[alice, bob], policy_id=policy["id"])
    second = await api.signer(members=[alice], policy_id=policy["id"])

    _, a1 = await approved_grant(api, alice, approver, first, allowedSignOperations=1)
    _, a2 = await approved_grant(api, alice, approver, second, allowedSignOperations=2)
    _, b1 = await approved_grant(api, bob, approver, first, allowedSignOperations=2)
    assert (await sign(api, alice, first)).status_code == 200  # a1 exhausted
    await api.call("POST", f"/pki/grants/{b1['id']}/revoke", approver, json={"reason": "left"}, expect=200)

    async def ids(who: Ident, query: str) -> set[str]:
        r = await api.call("GET", f"/pki/grants?{query}&limit=500", who, expect=200)
        body = r.json()
        assert body["total"] == len(body["items"])
        return {g["id"] for g in body["items"]}

    assert await ids(approver, f"signerId={first['id']}") == {a1["id"], b1["id"]}
    assert await ids(approver, f"signerId={second['id']}") == {a2["id"]}
    assert await ids(approver, f"identityId={alice.id}") == {a1["id"], a2["id"]}
    assert await ids(approver, f"identityId={alice.id}&signerId={first['id']}") == {a1["id"]}
    assert await ids(api.admin, f"identityId={alice.id}&status=exhausted") == {a1["id"]}
    assert await ids(api.admin, f"identityId={alice.id}&status=active") == {a2["id"]}
    assert await ids(api.admin, f"signerId={first['id']}&status=revoked") == {b1["id"]}
    assert await ids(api.admin, f"signerId={first['id']}&status=expired") == set()
    await api.call("GET", "/pki/grants?status=bogus", api.admin, expect=400)

    # A requester sees only their own grants, whatever they filter on.
    assert await ids(alice, "status=active") == {a2["id"]}
    assert await ids(alice, f"signerId={first['id']}") == {a1["id"]}
    assert await ids(alice, f"identityId={bob.id}") == set()
    own = (await api.call("GET", "/pki/grants?limit=500", alice, expect=200)).json()
    assert {g["identityId"] for g in own["items"]} == {alice.id}
    await api.call("GET", f"/pki/grants/{b1['id']}", alice, expect=403)
    await api.call("GET", f"/pki/grants/{a1['id']}", alice, expect=200)
    await api.call("POST", f"/pki/grants/{a2['id']}/revoke", bob, json={"reason": "not yours"}, expect=403)
    assert (await grant_of(api, a2["id"]))["status"] == "active"
    await api.call("GET", "/pki/grants/no-such-grant", api.admin, expect=404)
