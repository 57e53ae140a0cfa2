"""What every benchmark needs inside a signgate installation, created through the public API:
identities with tokens, certificates, 1-step and 3-step policies, signers, and grants obtained
the way a user obtains them (a request approved by someone else)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

BIG_GRANT = 1_000_000  # the API's ceiling for allowedSignOperations
WINDOW_SECONDS = 7 * 86400


@dataclass(frozen=True)
class Who:
    id: str
    name: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Fixtures:
    admin: Who
    requester: Who
    approvers: list[Who]
    signers: dict[str, dict[str, Any]] = field(default_factory=dict)


class Api:
    def __init__(self, base_url: str, admin_token: str) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url + "/api/v1",
            timeout=60,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
        )
        self.admin = Who("", "bench-admin", admin_token)
        self.read_after_create_misses = 0

    async def close(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, who: Who, *, expect: int | None = 200, **kw: Any) -> Any:
        r = await self.http.request(method, path, headers=who.headers, **kw)
        if expect is not None and r.status_code != expect:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    async def identity(self, name: str, scopes: list[str]) -> Who:
        ident = await self.call(
            "POST", "/identities", self.admin, json={"name": name, "kind": "user"}, expect=201
        )
        token = await self.call(
            "POST", f"/identities/{ident['id']}/tokens", self.admin, json={"scopes": scopes}, expect=201
        )
        return Who(ident["id"], name, token["token"])

    async def policy(self, approvers: list[Who], steps: int) -> dict[str, Any]:
        body = {
            "name": f"bench-{steps}-step-{uuid.uuid4().hex[:6]}",
            "steps": [
                {"name": f"step-{i + 1}", "approverIds": [approvers[i].id], "requiredApprovals": 1}
                for i in range(steps)
            ],
            "maxWindowSeconds": WINDOW_SECONDS,
            "maxSignings": BIG_GRANT,
        }
        return dict(await self.call("POST", "/pki/signing-policies", self.admin, json=body, expect=201))

    async def signer(self, key_algorithm: str, policy_id: str, members: list[Who]) -> dict[str, Any]:
        cert = await self.call(
            "POST",
            "/pki/certificates",
            self.admin,
            json={
                "name": f"bench-{key_algorithm.lower()}-{uuid.uuid4().hex[:6]}",
                "keyAlgorithm": key_algorithm,
                "subject": {"commonName": "signgate bench", "organization": "signgate"},
                "mode": "self-signed",
            },
            expect=201,
        )
        signer = await self.call(
            "POST",
            "/pki/signers",
            self.admin,
            json={
                "name": f"bench-{key_algorithm.lower().replace('_', '-')}-{uuid.uuid4().hex[:6]}",
                "certificateId": cert["id"],
                "signingPolicyId": policy_id,
            },
            expect=201,
        )
        # An API that answers 201 before its transaction commits (seen before f4c6b7b: the
        # session dependency committed after the response was sent) makes a PUT right after
        # miss the signer. Retried and counted, so the run goes on and the table says so.
        for attempt in range(50):
            r = await self.http.put(
                f"/pki/signers/{signer['id']}/members",
                headers=self.admin.headers,
                json={"identityIds": [m.id for m in members]},
            )
            if r.status_code != 404:
                break
            self.read_after_create_misses += 1
            await asyncio.sleep(0.02 * (attempt + 1))
        if r.status_code != 200:
            raise RuntimeError(f"PUT members: {r.status_code} {r.text[:300]}")
        return dict(signer)

    async def open_request(self, who: Who, signer_id: str, operations: int = 1) -> dict[str, Any]:
        return dict(
            await self.call(
                "POST",
                "/pki/signing-requests",
                who,
                json={
                    "signerId": signer_id,
                    "allowedSignOperations": operations,
                    "justification": "benchmark",
                },
                expect=201,
            )
        )

    async def approve(self, who: Who, request_id: str) -> dict[str, Any]:
        return dict(await self.call("POST", f"/pki/signing-requests/{request_id}/approve", who, json={}))

    async def grant(self, fx: Fixtures, signer_key: str, operations: int = BIG_GRANT) -> str:
        """A grant for the requester, obtained by a request that every step approves."""
        request = await self.open_request(fx.requester, fx.signers[signer_key]["id"], operations)
        state = request
        for step in range(len(request["steps"])):
            state = await self.approve(fx.approvers[step], request["id"])
        if state["status"] != "approved" or not state.get("grantId"):
            raise RuntimeError(f"request not approved with a grant: {state['status']}")
        return str(state["grantId"])


async def create_fixtures(api: Api) -> Fixtures:
    suffix = uuid.uuid4().hex[:6]
    requester = await api.identity(f"bench-requester-{suffix}", ["codesign:request", "codesign:sign"])
    approvers = [await api.identity(f"bench-approver{i}-{suffix}", ["codesign:approve"]) for i in range(3)]
    fx = Fixtures(admin=api.admin, requester=requester, approvers=approvers)
    one_step = await api.policy(approvers, 1)
    three_step = await api.policy(approvers, 3)
    # One signer per use, so a benchmark's grants never serve another's sign calls.
    fx.signers["ec"] = await api.signer("EC_P256", one_step["id"], [requester])
    fx.signers["rsa"] = await api.signer("RSA_2048", one_step["id"], [requester])
    fx.signers["ec1"] = await api.signer("EC_P256", one_step["id"], [requester])
    fx.signers["ec3"] = await api.signer("EC_P256", three_step["id"], [requester])
    fx.signers["flow"] = await api.signer("EC_P256", one_step["id"], [requester])
    fx.signers["scale"] = await api.signer("EC_P256", one_step["id"], [requester])
    return fx
