"""Signers over the API: creation rules, membership, visibility, updates, deletion, audit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from tests.conftest import Api, insert_grant, unique
from tests.test_certificates import audit_actions, openssl, pkcs12_bundle, write

SIGNER_FIELDS = {
    "id",
    "name",
    "description",
    "certificateId",
    "signingPolicyId",
    "status",
    "keyAlgorithm",
    "supportedAlgorithms",
    "createdAt",
    "updatedAt",
}


async def create_signer(api: Api, certificate_id: str, **extra: Any) -> Any:
    body = {"name": unique("signer"), "certificateId": certificate_id, **extra}
    return await api.call("POST", "/pki/signers", api.admin, json=body)


async def test_create_signer_shape_and_supported_algorithms(api: Api, engine: Engine) -> None:
    ec_cert = await api.certificate("EC_P256")
    rsa_cert = await api.certificate("RSA_2048")
    r = await create_signer(api, ec_cert["id"], description="release builds")
    assert r.status_code == 201, r.text
    signer = r.json()
    assert set(signer) == SIGNER_FIELDS
    assert signer["status"] == "active"
    assert signer["description"] == "release builds"
    assert signer["signingPolicyId"] is None
    assert signer["keyAlgorithm"] == "EC_P256"
    assert signer["supportedAlgorithms"] == ["ECDSA_SHA256", "ECDSA_SHA384", "ECDSA_SHA512"]
    r = await create_signer(api, rsa_cert["id"])
    assert r.json()["supportedAlgorithms"] == [
        "RSASSA_PKCS1_V1_5_SHA256",
        "RSASSA_PKCS1_V1_5_SHA384",
        "RSASSA_PKCS1_V1_5_SHA512",
        "RSASSA_PSS_SHA256",
        "RSASSA_PSS_SHA384",
        "RSASSA_PSS_SHA512",
    ]
    # Several signers may share one certificate.
    r = await create_signer(api, ec_cert["id"])
    assert r.status_code == 201 and r.json()["certificateId"] == ec_cert["id"]
    assert audit_actions(engine, signer["id"]) == ["signer.created"]


async def test_signer_name_rules(api: Api) -> None:
    cert = await api.certificate()
    name = unique("taken")
    r = await create_signer(api, cert["id"], name=name)
    assert r.status_code == 201
    r = await create_signer(api, cert["id"], name=name)
    assert (r.status_code, r.json()["error"]) == (409, "name_taken")
    for bad in ("Upper", "-lead", "under_score", "a" * 65, "", "sp ace"):
        r = await create_signer(api, cert["id"], name=bad)
        assert r.status_code == 400, bad
    r = await create_signer(api, cert["id"], name="a" * 64)
    assert r.status_code in (201, 409)


async def test_signer_refuses_unfit_certificates(api: Api) -> None:
    r = await api.call(
        "POST",
        "/pki/certificates",
        api.admin,
        json={"name": unique("c"), "keyAlgorithm": "EC_P256", "subject": {"commonName": "x"}, "mode": "csr"},
        expect=201,
    )
    awaiting = r.json()["id"]
    bundle, _, _ = pkcs12_bundle("pw", code_signing=False)
    r = await api.call(
        "POST",
        "/pki/certificates/import",
        api.admin,
        json={"name": "no-eku", "pkcs12": bundle, "password": "pw"},
    )
    no_eku = r.json()["id"]
    now = datetime.now(UTC)
    bundle, _, _ = pkcs12_bundle("pw", not_before=now - timedelta(days=9), not_after=now - timedelta(days=1))
    r = await api.call(
        "POST",
        "/pki/certificates/import",
        api.admin,
        json={"name": "expired", "pkcs12": bundle, "password": "pw"},
    )
    assert any("expired" in w for w in r.json()["warnings"])
    expired = r.json()["id"]
    for certificate_id in (awaiting, no_eku, expired, "no-such-certificate"):
        r = await create_signer(api, certificate_id)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_certificate"), certificate_id
    r = await create_signer(api, (await api.certificate())["id"], signingPolicyId="no-such-policy")
    assert (r.status_code, r.json()["error"]) == (400, "unknown_signing_policy")


async def test_members_visibility_and_access(api: Api, engine: Engine, tmp_path: Path) -> None:
    alice = await api.identity()
    bob = await api.identity()
    signer = await api.signer(members=[alice])
    sid = signer["id"]

    r = await api.call("GET", f"/pki/signers/{sid}/members", api.admin, expect=200)
    assert r.json() == {"items": [{"id": alice.id, "name": alice.name, "kind": "user"}], "total": 1}
    r = await api.call(
        "PUT",
        f"/pki/signers/{sid}/members",
        api.admin,
        json={"identityIds": [alice.id, "nobody"]},
        expect=400,
    )
    assert r.json()["error"] == "unknown_identity"
    r = await api.call("GET", f"/pki/signers/{sid}/members", alice, expect=200)
    assert [m["id"] for m in r.json()["items"]] == [alice.id]
    await api.call("PUT", f"/pki/signers/{sid}/members", alice, json={"identityIds": [alice.id]}, expect=403)

    # A member sees the signer in the list and may read it and its certificate; others may not.
    r = await api.call("GET", "/pki/signers?limit=500", alice, expect=200)
    assert [s["id"] for s in r.json()["items"]] == [sid] and r.json()["total"] == 1
    r = await api.call("GET", "/pki/signers", bob, expect=200)
    assert r.json() == {"items": [], "total": 0}
    r = await api.call("GET", "/pki/signers?limit=500", api.admin, expect=200)
    assert sid in [s["id"] for s in r.json()["items"]]
    await api.call("GET", f"/pki/signers/{sid}", alice, expect=200)
    await api.call("GET", f"/pki/signers/{sid}", api.admin, expect=200)
    r = await api.call("GET", f"/pki/signers/{sid}", bob, expect=403)
    assert r.json()["error"] == "not_member"
    await api.call("GET", "/pki/signers/no-such-signer", alice, expect=404)
    r = await api.call("GET", f"/pki/signers/{sid}/certificate", alice, expect=200)
    assert r.headers["content-type"].startswith("application/x-pem-file")
    pem = write(tmp_path / "signer.pem", r.text)
    out = openssl("x509", "-in", str(pem), "-noout", "-ext", "extendedKeyUsage")
    assert b"Code Signing" in out.stdout
    await api.call("GET", f"/pki/signers/{sid}/certificate", bob, expect=403)

    r = await api.call(
        "PUT", f"/pki/signers/{sid}/members", api.admin, json={"identityIds": [bob.id, bob.id]}, expect=200
    )
    assert [m["id"] for m in r.json()["items"]] == [bob.id]
    await api.call("GET", f"/pki/signers/{sid}", alice, expect=403)
    await api.call("GET", f"/pki/signers/{sid}", bob, expect=200)
    assert audit_actions(engine, sid) == ["signer.created", "signer.members_set", "signer.members_set"]


async def test_patch_signer(api: Api, app: Any, engine: Engine) -> None:
    member = await api.identity(scopes=["codesign:sign"])
    signer = await api.signer(members=[member])
    sid = signer["id"]
    r = await api.call("PATCH", f"/pki/signers/{sid}", api.admin, json={"description": "nightly"}, expect=200)
    assert r.json()["description"] == "nightly"
    approver = await api.identity()
    policy = await api.policy([([approver], 1)])
    r = await api.call(
        "PATCH", f"/pki/signers/{sid}", api.admin, json={"signingPolicyId": policy["id"]}, expect=200
    )
    assert r.json()["signingPolicyId"] == policy["id"]
    r = await api.call(
        "PATCH", f"/pki/signers/{sid}", api.admin, json={"signingPolicyId": "no-such-policy"}, expect=400
    )
    assert r.json()["error"] == "unknown_signing_policy"
    r = await api.call("PATCH", f"/pki/signers/{sid}", api.admin, json={"signingPolicyId": None}, expect=200)
    assert r.json()["signingPolicyId"] is None
    await api.call("PATCH", f"/pki/signers/{sid}", api.admin, json={"status": "paused"}, expect=400)
    await api.call("PATCH", f"/pki/signers/{sid}", api.admin, json={"status": None}, expect=400)
    await api.call("PATCH", f"/pki/signers/{sid}", member, json={"description": "x"}, expect=403)
    await api.call("PATCH", "/pki/signers/no-such-signer", api.admin, json={"description": "x"}, expect=404)

    # Signing caches the opened key; disabling the only signer of the certificate drops it.
    key_store = app.state.ctx.key_store
    await api.call(
        "POST",
        f"/pki/signers/{sid}/sign",
        member,
        json={"data": "aGVsbG8=", "signingAlgorithm": "ECDSA_SHA256", "isDigest": False},
        expect=200,
    )
    assert signer["certificateId"] in key_store._cache
    r = await api.call("PATCH", f"/pki/signers/{sid}", api.admin, json={"status": "disabled"}, expect=200)
    assert r.json()["status"] == "disabled"
    assert signer["certificateId"] not in key_store._cache
    r = await api.call("PATCH", f"/pki/signers/{sid}", api.admin, json={"status": "active"}, expect=200)
    assert r.json()["status"] == "active"
    actions = audit_actions(engine, sid)
    assert actions.count("signer.updated") == 5


async def test_disabling_one_of_two_signers_keeps_the_shared_key_cached(api: Api, app: Any) -> None:
    member = await api.identity(scopes=["codesign:sign"])
    cert = await api.certificate()
    first = await api.signer(members=[member], certificate_id=cert["id"])
    second = await api.signer(members=[member], certificate_id=cert["id"])
    await api.call(
        "POST",
        f"/pki/signers/{first['id']}/sign",
        member,
        json={"data": "aGVsbG8=", "signingAlgorithm": "ECDSA_SHA256"},
        expect=200,
    )
    await api.call("PATCH", f"/pki/signers/{first['id']}", api.admin, json={"status": "disabled"}, expect=200)
    assert cert["id"] in app.state.ctx.key_store._cache
    await api.call(
        "PATCH", f"/pki/signers/{second['id']}", api.admin, json={"status": "disabled"}, expect=200
    )
    assert cert["id"] not in app.state.ctx.key_store._cache


async def test_delete_signer(api: Api, engine: Engine) -> None:
    member = await api.identity()
    signer = await api.signer(members=[member])
    await api.call("DELETE", f"/pki/signers/{signer['id']}", member, expect=403)
    await api.call("DELETE", f"/pki/signers/{signer['id']}", api.admin, expect=204)
    await api.call("GET", f"/pki/signers/{signer['id']}", api.admin, expect=404)
    await api.call("DELETE", f"/pki/signers/{signer['id']}", api.admin, expect=404)
    assert audit_actions(engine, signer["id"])[-1] == "signer.deleted"

    used = await api.signer(members=[member])
    insert_grant(engine, signer_id=used["id"], identity_id=member.id, operations=1)
    r = await api.call("DELETE", f"/pki/signers/{used['id']}", api.admin, expect=409)
    assert r.json()["error"] == "signer_in_use"
    await api.call("GET", f"/pki/signers/{used['id']}", api.admin, expect=200)
