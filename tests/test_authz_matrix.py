"""The authorization matrix: every endpoint the app serves, called by every kind of caller.

Rows come from `app.openapi()["paths"]`, so an endpoint added without a row in `MATRIX` fails
`test_every_endpoint_has_a_row`. Columns are the token problems (each must be a 401 with one and
the same body) and each scope alone. The single-scope identities are all members of the signer
and approvers of its policy, so a 403 in a scope column is about the scope (or, where a row says
so, about whose resource it is), never about membership; membership is tested on its own below.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, update
from sqlmodel import Session

from store.identities import SCOPES
from store.models import ApiToken
from tests.conftest import Api, Ident, insert_grant, unique

PUBLIC_PATHS = {"/healthz", "/readyz", "/metrics"}
PUBLIC_DOCS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
TOKEN_PROBLEMS = ("no token", "malformed header", "unknown token", "revoked token", "expired token")
EC_ALGORITHM = "ECDSA_SHA256"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def expire_token(engine: Engine, token_id: str) -> None:
    """ttlSeconds is at least 60, so an expired token is made by moving its expiry into the past."""
    with Session(engine) as session:
        session.execute(
            update(ApiToken)
            .where(ApiToken.id == token_id)  # type: ignore[arg-type]
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        session.commit()


@dataclass
class World:
    """Real resources, so every path parameter resolves."""

    api: Api
    engine: Engine
    by_scope: dict[str, Ident]
    bystander: Ident
    certificate_id: str
    policy_id: str
    signer_id: str
    request_id: str
    grant_id: str
    pre_approval_id: str
    bad_headers: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def approver(self) -> Ident:
        return self.by_scope["codesign:approve"]

    @property
    def requester(self) -> Ident:
        return self.by_scope["codesign:request"]

    def ids(self) -> dict[str, str]:
        return {
            "identity_id": self.bystander.id,
            "token_id": str(uuid.uuid4()),
            "certificate_id": self.certificate_id,
            "signer_id": self.signer_id,
            "policy_id": self.policy_id,
            "request_id": self.request_id,
            "grant_id": self.grant_id,
            "pre_approval_id": self.pre_approval_id,
        }

    async def fresh_token(self) -> dict[str, str]:
        r = await self.api.call(
            "POST",
            f"/identities/{self.bystander.id}/tokens",
            self.api.admin,
            json={"scopes": ["audit:read"]},
            expect=201,
        )
        return {"identity_id": self.bystander.id, "token_id": r.json()["id"]}

    async def fresh_signer(self) -> dict[str, str]:
        body = {"name": unique("scratch"), "certificateId": self.certificate_id}
        r = await self.api.call("POST", "/pki/signers", self.api.admin, json=body, expect=201)
        return {"signer_id": r.json()["id"]}

    async def fresh_policy(self) -> dict[str, str]:
        policy = await self.api.policy([([self.approver], 1)])
        return {"policy_id": policy["id"]}

    async def fresh_request(self) -> dict[str, str]:
        request = await self.api.open_request(self.requester, self.signer_id, justification="matrix")
        return {"request_id": request["id"]}

    async def fresh_grant(self) -> dict[str, str]:
        grant_id = insert_grant(
            self.engine,
            signer_id=self.signer_id,
            identity_id=self.by_scope["codesign:sign"].id,
            operations=1000,
            valid_for=timedelta(hours=2),
        )
        return {"grant_id": grant_id}

    async def fresh_pre_approval(self) -> dict[str, str]:
        body = {"signerId": self.signer_id, "identityId": self.bystander.id, "comment": "matrix"}
        r = await self.api.call("POST", "/pki/pre-approvals", self.approver, json=body, expect=201)
        return {"pre_approval_id": r.json()["id"]}


Fresh = Callable[[World], Awaitable[dict[str, str]]]
Body = Callable[[World], Any]

ALL = frozenset(SCOPES)
ADMIN = frozenset({"admin"})


@dataclass(frozen=True)
class Row:
    """Who gets past authorization on one endpoint, and how to call it.

    `allowed`: the scopes whose holder (a member of the signer, an approver of its policy) is
    let through; every other scope must get a 403. `fresh` builds a resource of the cell's own
    for calls that change or consume what they touch, so cells stay independent.
    """

    allowed: frozenset[str]
    body: Body | None = None
    fresh: Fresh | None = None
    why: str = ""


def _sign_body(_: World) -> dict[str, Any]:
    return {"data": b64(b"matrix"), "signingAlgorithm": EC_ALGORITHM}


MATRIX: dict[tuple[str, str], Row] = {
    # Identities and tokens: admin manages them; /me is anyone's.
    ("POST", "/api/v1/identities"): Row(ADMIN, body=lambda w: {"name": unique("m"), "kind": "machine"}),
    ("GET", "/api/v1/identities"): Row(ADMIN),
    ("GET", "/api/v1/identities/{identity_id}"): Row(ADMIN),
    ("GET", "/api/v1/me"): Row(ALL),
    ("POST", "/api/v1/identities/{identity_id}/tokens"): Row(
        ADMIN, body=lambda w: {"scopes": ["audit:read"]}
    ),
    ("DELETE", "/api/v1/identities/{identity_id}/tokens/{token_id}"): Row(ADMIN, fresh=World.fresh_token),
    # Certificates: admin only.
    ("POST", "/api/v1/pki/certificates"): Row(
        ADMIN,
        body=lambda w: {
            "name": unique("cert"),
            "keyAlgorithm": "EC_P256",
            "subject": {"commonName": "matrix"},
            "mode": "csr",
        },
    ),
    ("GET", "/api/v1/pki/certificates"): Row(ADMIN),
    ("POST", "/api/v1/pki/certificates/import"): Row(
        ADMIN, body=lambda w: {"name": unique("imported"), "pkcs12": b64(b"not a pkcs12")}
    ),
    ("POST", "/api/v1/pki/certificates/{certificate_id}/certificate"): Row(
        ADMIN,
        body=lambda w: {"certificatePem": "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"},
    ),
    ("GET", "/api/v1/pki/certificates/{certificate_id}"): Row(ADMIN),
    ("GET", "/api/v1/pki/certificates/{certificate_id}/chain"): Row(ADMIN),
    # Signers: admin manages; members read and verify; only codesign:sign signs.
    ("POST", "/api/v1/pki/signers"): Row(
        ADMIN, body=lambda w: {"name": unique("signer"), "certificateId": w.certificate_id}
    ),
    ("GET", "/api/v1/pki/signers"): Row(ALL),
    ("GET", "/api/v1/pki/signers/{signer_id}"): Row(ALL, why="members read their signer"),
    ("PATCH", "/api/v1/pki/signers/{signer_id}"): Row(ADMIN, body=lambda w: {"description": "matrix"}),
    ("DELETE", "/api/v1/pki/signers/{signer_id}"): Row(ADMIN, fresh=World.fresh_signer),
    ("PUT", "/api/v1/pki/signers/{signer_id}/members"): Row(
        ADMIN, body=lambda w: {"identityIds": []}, fresh=World.fresh_signer
    ),
    ("GET", "/api/v1/pki/signers/{signer_id}/members"): Row(ALL, why="members read their signer"),
    ("GET", "/api/v1/pki/signers/{signer_id}/certificate"): Row(ALL, why="members read their signer"),
    ("POST", "/api/v1/pki/signers/{signer_id}/sign"): Row(frozenset({"codesign:sign"}), body=_sign_body),
    ("POST", "/api/v1/pki/signers/{signer_id}/verify"): Row(
        ALL,
        body=lambda w: {
            "data": b64(b"matrix"),
            "signature": b64(bytes(70)),
            "signingAlgorithm": EC_ALGORITHM,
        },
        why="members verify",
    ),
    ("GET", "/api/v1/pki/signers/{signer_id}/operations"): Row(frozenset({"admin", "audit:read"})),
    # Signing policies: admin manages, anyone authenticated reads.
    ("POST", "/api/v1/pki/signing-policies"): Row(
        ADMIN,
        body=lambda w: {
            "name": unique("policy"),
            "steps": [{"name": "review", "approverIds": [w.approver.id], "requiredApprovals": 1}],
        },
    ),
    ("GET", "/api/v1/pki/signing-policies"): Row(ALL),
    ("GET", "/api/v1/pki/signing-policies/{policy_id}"): Row(ALL),
    ("PATCH", "/api/v1/pki/signing-policies/{policy_id}"): Row(
        ADMIN, body=lambda w: {"maxSignings": 5}, fresh=World.fresh_policy
    ),
    ("DELETE", "/api/v1/pki/signing-policies/{policy_id}"): Row(ADMIN, fresh=World.fresh_policy),
    # Signing requests. The codesign:request identity is the requester of every request here.
    ("POST", "/api/v1/pki/signing-requests"): Row(
        frozenset({"codesign:request"}), body=lambda w: {"signerId": w.signer_id}
    ),
    ("GET", "/api/v1/pki/signing-requests"): Row(ALL, why="each sees what is theirs"),
    ("GET", "/api/v1/pki/signing-requests/{request_id}"): Row(
        frozenset({"admin", "audit:read", "codesign:approve", "codesign:request"}),
        why="requester, approvers of its steps, admin and auditors see a request",
    ),
    ("POST", "/api/v1/pki/signing-requests/{request_id}/approve"): Row(
        frozenset({"codesign:approve"}), body=lambda w: {"comment": "matrix"}, fresh=World.fresh_request
    ),
    ("POST", "/api/v1/pki/signing-requests/{request_id}/reject"): Row(
        frozenset({"codesign:approve"}), body=lambda w: {"comment": "matrix"}, fresh=World.fresh_request
    ),
    ("POST", "/api/v1/pki/signing-requests/{request_id}/cancel"): Row(
        frozenset({"admin", "codesign:request"}),
        body=lambda w: {"comment": "matrix"},
        fresh=World.fresh_request,
        why="the requester or an admin",
    ),
    ("POST", "/api/v1/pki/signing-requests/{request_id}/resubmit"): Row(
        frozenset({"codesign:request"}),
        body=lambda w: {"signerId": w.signer_id},
        why="the requester; 409 as the original is still open",
    ),
    ("GET", "/api/v1/pki/signing-requests/{request_id}/result"): Row(
        frozenset({"admin", "audit:read", "codesign:approve", "codesign:request"})
    ),
    # Grants. The codesign:sign identity holds them.
    ("GET", "/api/v1/pki/grants"): Row(ALL, why="each sees their own"),
    ("GET", "/api/v1/pki/grants/{grant_id}"): Row(
        frozenset({"admin", "audit:read", "codesign:approve", "codesign:sign"}), why="or its holder"
    ),
    ("POST", "/api/v1/pki/grants/{grant_id}/revoke"): Row(
        frozenset({"admin", "codesign:approve", "codesign:sign"}),
        body=lambda w: {"reason": "matrix"},
        fresh=World.fresh_grant,
        why="admins, approvers, or the holder giving it up",
    ),
    # Pre-approvals: approvers create them, for someone else (the bystander here).
    ("POST", "/api/v1/pki/pre-approvals"): Row(
        frozenset({"codesign:approve"}),
        body=lambda w: {"signerId": w.signer_id, "identityId": w.bystander.id, "comment": "matrix"},
    ),
    ("GET", "/api/v1/pki/pre-approvals"): Row(ALL, why="each sees their own"),
    ("GET", "/api/v1/pki/pre-approvals/{pre_approval_id}"): Row(
        frozenset({"admin", "audit:read", "codesign:approve"})
    ),
    ("DELETE", "/api/v1/pki/pre-approvals/{pre_approval_id}"): Row(
        frozenset({"admin", "codesign:approve"}), fresh=World.fresh_pre_approval
    ),
    # Audit.
    ("GET", "/api/v1/audit-events"): Row(frozenset({"audit:read"})),
    ("GET", "/api/v1/audit-events/verify"): Row(frozenset({"audit:read"})),
}


def served_operations(app: Any) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method in {"get", "post", "put", "patch", "delete"}
    }


def test_every_endpoint_has_a_row(app: Any) -> None:
    served = served_operations(app)
    protected = {op for op in served if op[1] not in PUBLIC_PATHS}
    assert {op[1] for op in served} - {op[1] for op in protected} == PUBLIC_PATHS
    missing = sorted(protected - MATRIX.keys())
    assert not missing, f"endpoints without a row in the authorization matrix: {missing}"
    stale = sorted(MATRIX.keys() - protected)
    assert not stale, f"rows for endpoints the app no longer serves: {stale}"
    assert all(path.startswith("/api/v1/") for _, path in protected)


@pytest.fixture(scope="module")
async def world(api: Api, engine: Engine) -> World:
    by_scope = {
        scope: await api.identity(unique(scope.replace(":", "-")), scopes=[scope]) for scope in SCOPES
    }
    bystander = await api.identity(unique("bystander"), scopes=["codesign:request"])
    everyone = list(by_scope.values())
    policy = await api.policy([(everyone, 1)])
    certificate = await api.certificate("EC_P256")
    signer = await api.signer(members=everyone, policy_id=policy["id"], certificate_id=certificate["id"])
    world = World(
        api=api,
        engine=engine,
        by_scope=by_scope,
        bystander=bystander,
        certificate_id=certificate["id"],
        policy_id=policy["id"],
        signer_id=signer["id"],
        request_id="",
        grant_id="",
        pre_approval_id="",
    )
    world.request_id = (await world.fresh_request())["request_id"]
    world.grant_id = (await world.fresh_grant())["grant_id"]
    world.pre_approval_id = (await world.fresh_pre_approval())["pre_approval_id"]

    # The token problems all belong to an identity that could do anything with a good token.
    holder = await api.identity(unique("holder"), scopes=list(SCOPES))
    await api.call(
        "PUT",
        f"/pki/signers/{signer['id']}/members",
        api.admin,
        json={"identityIds": [m.id for m in [*everyone, holder]]},
        expect=200,
    )
    revoked = await api.call(
        "POST", f"/identities/{holder.id}/tokens", api.admin, json={"scopes": list(SCOPES)}, expect=201
    )
    await api.call("DELETE", f"/identities/{holder.id}/tokens/{revoked.json()['id']}", api.admin, expect=204)
    expired = await api.call(
        "POST",
        f"/identities/{holder.id}/tokens",
        api.admin,
        json={"scopes": list(SCOPES), "ttlSeconds": 60},
        expect=201,
    )
    expire_token(engine, expired.json()["id"])
    world.bad_headers = {
        "no token": {},
        "malformed header": {"Authorization": f"Basic {b64(holder.token.encode())}"},
        "unknown token": {"Authorization": f"Bearer sgt_{secrets.token_urlsafe(32)}"},
        "revoked token": {"Authorization": f"Bearer {revoked.json()['token']}"},
        "expired token": {"Authorization": f"Bearer {expired.json()['token']}"},
    }
    return world


async def call(
    world: World, method: str, template: str, headers: dict[str, str], ids: dict[str, str]
) -> httpx.Response:
    row = MATRIX[(method, template)]
    kwargs: dict[str, Any] = {"headers": headers}
    if row.body is not None:
        kwargs["json"] = row.body(world)
    return await world.api.http.request(method, template.format(**ids), **kwargs)


@pytest.mark.parametrize(("method", "template"), sorted(MATRIX), ids=[f"{m} {p}" for m, p in sorted(MATRIX)])
async def test_matrix(world: World, method: str, template: str) -> None:
    row = MATRIX[(method, template)]
    wrong: list[str] = []
    unauthorized_bodies: dict[str, Any] = {}
    for problem in TOKEN_PROBLEMS:
        r = await call(world, method, template, world.bad_headers[problem], world.ids())
        if r.status_code != 401:
            wrong.append(f"{problem}: {r.status_code} {r.text}")
            continue
        unauthorized_bodies[problem] = r.json()
        assert r.headers.get("www-authenticate") == "Bearer"
    for scope in SCOPES:
        ids = world.ids() | (await row.fresh(world) if row.fresh else {})
        r = await call(world, method, template, world.by_scope[scope].headers, ids)
        if scope in row.allowed:
            if r.status_code in (401, 403) or r.status_code >= 500:
                wrong.append(f"{scope} alone should pass: {r.status_code} {r.text}")
        elif r.status_code != 403:
            wrong.append(f"{scope} alone should be 403: {r.status_code} {r.text}")
        elif set(r.json()) != {"error", "error_description"}:
            wrong.append(f"{scope}: 403 body is not the contract's: {r.text}")
    assert not wrong, f"{method} {template}:\n  " + "\n  ".join(wrong)
    # One body for every token problem: nothing tells a caller which part was wrong.
    assert len({repr(b) for b in unauthorized_bodies.values()}) == 1, unauthorized_bodies
    assert next(iter(unauthorized_bodies.values()))["error"] == "unauthorized"


async def test_unauthorized_body_is_the_same_everywhere(world: World) -> None:
    bodies = set()
    for method, template in sorted(MATRIX):
        for problem in TOKEN_PROBLEMS:
            r = await call(world, method, template, world.bad_headers[problem], world.ids())
            bodies.add(r.text)
    assert len(bodies) == 1, bodies


async def test_token_problem_wins_over_a_bad_body_or_unknown_id(world: World) -> None:
    """401 comes before validation and lookups, so no answer depends on the rest of the call."""
    nowhere = dict.fromkeys(world.ids(), "no-such-id")
    for method, template in sorted(MATRIX):
        for problem in ("no token", "unknown token"):
            headers = world.bad_headers[problem]
            r = await world.api.http.request(
                method, template.format(**nowhere), headers=headers, json={"bogus": 1}, params={"limit": "-1"}
            )
            assert r.status_code == 401, f"{problem} {method} {template}: {r.status_code} {r.text}"


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token sgt_abc",
        "sgt_abc",
        "Bearer sgt_",
        "Bearer " + "sgt_" + "A" * 5000,
        "Bearer not-a-signgate-token",
    ],
)
async def test_malformed_headers_are_401(world: World, header: str) -> None:
    r = await world.api.http.get("/api/v1/me", headers={"Authorization": header})
    assert r.status_code == 401
    r_missing = await world.api.http.get("/api/v1/me")
    assert r.json() == r_missing.json()


async def test_a_token_with_one_character_changed_is_unknown(world: World) -> None:
    token = world.approver.token
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    r = await world.api.http.get("/api/v1/me", headers={"Authorization": f"Bearer {flipped}"})
    assert r.status_code == 401
    assert (await world.api.call("GET", "/me", world.approver)).status_code == 200


@pytest.mark.parametrize("path", sorted(PUBLIC_PATHS | PUBLIC_DOCS))
async def test_operational_endpoints_are_public(http: httpx.AsyncClient, path: str) -> None:
    r = await http.get(path)
    assert r.status_code not in (401, 403), r.text
    if path != "/readyz":
        assert r.status_code == 200


# --- membership: the matrix's identities are members and approvers; here they are not -----------


async def test_sign_needs_membership(world: World) -> None:
    api = world.api
    outsider = await api.identity(unique("outsider"), scopes=["codesign:sign"])
    insert_grant(
        world.engine,
        signer_id=world.signer_id,
        identity_id=outsider.id,
        operations=1000,
        valid_for=timedelta(hours=2),
    )
    body = _sign_body(world)
    r = await api.call("POST", f"/pki/signers/{world.signer_id}/sign", outsider, json=body, expect=403)
    assert r.json()["error"] == "not_member"
    await api.call(
        "PUT",
        f"/pki/signers/{world.signer_id}/members",
        api.admin,
        json={"identityIds": [*[i.id for i in world.by_scope.values()], outsider.id]},
        expect=200,
    )
    r = await api.call("POST", f"/pki/signers/{world.signer_id}/sign", outsider, json=body, expect=200)
    assert r.json()["signerId"] == world.signer_id
    await api.call(
        "PUT",
        f"/pki/signers/{world.signer_id}/members",
        api.admin,
        json={"identityIds": [i.id for i in world.by_scope.values()]},
        expect=200,
    )
    # Membership is read on every call: dropped from the signer, refused at once.
    await api.call("POST", f"/pki/signers/{world.signer_id}/sign", outsider, json=body, expect=403)


async def test_requesting_needs_membership(world: World) -> None:
    outsider = await world.api.identity(unique("outsider"), scopes=["codesign:request"])
    await world.api.call(
        "POST", "/pki/signing-requests", outsider, json={"signerId": world.signer_id}, expect=403
    )


async def test_reading_a_signer_needs_membership_or_admin(world: World) -> None:
    api = world.api
    outsider = await api.identity(unique("outsider"), scopes=list(SCOPES[1:]))
    admin_only = await api.identity(unique("outsider-admin"), scopes=["admin"])
    verify = {"data": b64(b"x"), "signature": b64(bytes(70)), "signingAlgorithm": EC_ALGORITHM}
    for method, suffix, body in (
        ("GET", "", None),
        ("GET", "/members", None),
        ("GET", "/certificate", None),
        ("POST", "/verify", verify),
    ):
        path = f"/pki/signers/{world.signer_id}{suffix}"
        r = await api.call(method, path, outsider, json=body)
        assert r.status_code == 403, f"{method} {path}: {r.status_code}"
        r = await api.call(method, path, admin_only, json=body)
        assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text}"
    r = await api.call("GET", "/pki/signers", outsider, expect=200)
    assert world.signer_id not in {s["id"] for s in r.json()["items"]}


async def test_approving_needs_a_place_among_the_approvers(world: World) -> None:
    api = world.api
    outsider = await api.identity(unique("outsider"), scopes=["codesign:approve"])
    request_id = (await world.fresh_request())["request_id"]
    r = await api.call("POST", f"/pki/signing-requests/{request_id}/approve", outsider, json={}, expect=403)
    assert r.json()["error"] == "not_eligible"
    body = {"signerId": world.signer_id, "identityId": world.bystander.id, "comment": "no"}
    await api.call("POST", "/pki/pre-approvals", outsider, json=body, expect=403)
    r = await api.call(
        "POST", f"/pki/signing-requests/{request_id}/approve", world.approver, json={}, expect=200
    )
    assert r.json()["status"] == "approved"


async def test_nobody_approves_or_pre_approves_their_own_request(world: World) -> None:
    api = world.api
    both = await api.identity(unique("self"), scopes=["codesign:request", "codesign:approve"])
    policy = await api.policy([([both, world.approver], 1)])
    signer = await api.signer(members=[both], policy_id=policy["id"], certificate_id=world.certificate_id)
    request = await api.open_request(both, signer["id"])
    r = await api.call("POST", f"/pki/signing-requests/{request['id']}/approve", both, json={}, expect=403)
    assert r.json()["error"] == "not_eligible"
    body = {"signerId": signer["id"], "identityId": both.id, "comment": "me"}
    await api.call("POST", "/pki/pre-approvals", both, json=body, expect=403)


async def test_admin_alone_neither_approves_nor_signs(world: World) -> None:
    """Even as a member, an approver of the step and the holder of a grant."""
    api = world.api
    admin = world.by_scope["admin"]
    insert_grant(
        world.engine,
        signer_id=world.signer_id,
        identity_id=admin.id,
        operations=1000,
        valid_for=timedelta(hours=2),
    )
    request_id = (await world.fresh_request())["request_id"]
    for decision in ("approve", "reject"):
        await api.call("POST", f"/pki/signing-requests/{request_id}/{decision}", admin, json={}, expect=403)
    body = {"signerId": world.signer_id, "identityId": world.bystander.id, "comment": "admin"}
    await api.call("POST", "/pki/pre-approvals", admin, json=body, expect=403)
    await api.call("POST", f"/pki/signers/{world.signer_id}/sign", admin, json=_sign_body(world), expect=403)
    # The bootstrap admin (admin + audit:read, no membership) cannot either.
    await api.call(
        "POST", f"/pki/signers/{world.signer_id}/sign", api.admin, json=_sign_body(world), expect=403
    )
    await api.call("POST", f"/pki/signing-requests/{request_id}/approve", api.admin, json={}, expect=403)
    r = await api.call("GET", f"/pki/signing-requests/{request_id}", api.admin, expect=200)
    assert r.json()["status"] == "open"
