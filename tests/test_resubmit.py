"""Resubmission: an artifact test-signed under a test signer goes to release signing under
another signer's two-step policy, and the release signature verifies with openssl."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, Ident, assert_eventually
from tests.test_certificates import openssl, write

ARTIFACT = b"\x7fELF signgate release candidate 2.4.0\n" + bytes(range(256)) * 8
ORIGIN = {
    "repository": "https://git.example.org/acme/tool",
    "commit": "9fceb02d0ae598e95dc970b74767f19372d61af8",
    "buildUrl": "https://ci.example.org/acme/tool/builds/4711",
    "branch": "release/2.4",
}


@dataclass
class ReleaseSetup:
    requester: Ident
    first: list[Ident]
    release_approver: Ident
    test_signer: dict[str, Any]
    release_signer: dict[str, Any]


async def _setup(api: Api, *, key_algorithm: str = "EC_P256", machine_bypass: bool = False) -> ReleaseSetup:
    """A test signer (self-signed, no approval: no policy, or a machine under machine bypass)
    and a release signer under a two-step policy, both open to the requester."""
    requester = await api.identity(kind="machine" if machine_bypass else "user")
    first = [await api.identity() for _ in range(2)]
    release_approver = await api.identity()
    test_policy_id = None
    if machine_bypass:
        test_policy = await api.policy([([first[0]], 1)], allowMachineBypass=True)
        test_policy_id = test_policy["id"]
    test_signer = await api.signer(members=[requester], policy_id=test_policy_id, key_algorithm=key_algorithm)
    release_policy = await api.policy([(first, 1), ([release_approver], 1)])
    release_signer = await api.signer(
        members=[requester], policy_id=release_policy["id"], key_algorithm=key_algorithm
    )
    return ReleaseSetup(requester, first, release_approver, test_signer, release_signer)


def _artifact(signing_algorithm: str, fmt: str) -> dict[str, Any]:
    return {
        "name": "tool-2.4.0.bin",
        "digest": base64.b64encode(hashlib.sha256(ARTIFACT).digest()).decode(),
        "digestAlgorithm": "SHA256",
        "signingAlgorithm": signing_algorithm,
        "format": fmt,
    }


async def _result(api: Api, who: Ident, request_id: str) -> dict[str, Any]:
    r = await api.call("GET", f"/pki/signing-requests/{request_id}/result?waitSeconds=10", who, expect=200)
    return dict(r.json())


async def _detail(api: Api, who: Ident, request_id: str) -> dict[str, Any]:
    r = await api.call("GET", f"/pki/signing-requests/{request_id}", who, expect=200)
    return dict(r.json())


async def _certificate_pem(api: Api, signer: dict[str, Any], who: Ident) -> str:
    r = await api.call("GET", f"/pki/signers/{signer['id']}/certificate", who, expect=200)
    return r.text


async def _test_signed(api: Api, s: ReleaseSetup, artifact: dict[str, Any]) -> dict[str, Any]:
    req = await api.open_request(
        s.requester,
        s.test_signer["id"],
        artifact=artifact,
        origin=ORIGIN,
        justification="test build 2.4.0-rc1",
    )
    done = await _result(api, s.requester, req["id"])
    assert done["status"] == "approved", done
    assert done["signature"], done
    return done


def _cms_verifies(tmp_path: Path, signature_b64: str, content: bytes, ca_pem: str) -> bool:
    sig = write(tmp_path / "a.p7s", base64.b64decode(signature_b64))
    data = write(tmp_path / "a.bin", content)
    ca = write(tmp_path / "ca.pem", ca_pem)
    result = openssl(
        "cms", "-verify", "-binary", "-inform", "DER", "-in", str(sig), "-content", str(data),
        "-CAfile", str(ca), "-purpose", "any", "-out", str(tmp_path / "out.bin"),
    )  # fmt: skip
    return result.returncode == 0


def _raw_verifies(tmp_path: Path, signature_b64: str, content: bytes, cert_pem: str, pss: bool) -> bool:
    cert = write(tmp_path / "cert.pem", cert_pem)
    pub = openssl("x509", "-in", str(cert), "-pubkey", "-noout")
    assert pub.returncode == 0, pub.stderr
    pub_file = write(tmp_path / "pub.pem", pub.stdout)
    sig = write(tmp_path / "a.sig", base64.b64decode(signature_b64))
    data = write(tmp_path / "a.bin", content)
    args = ["dgst", "-sha256", "-verify", str(pub_file), "-signature", str(sig)]
    if pss:
        args += ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"]
    return openssl(*args, str(data)).returncode == 0


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


async def _approve_both_steps(api: Api, s: ReleaseSetup, request_id: str) -> dict[str, Any]:
    r = await api.call(
        "POST",
        f"/pki/signing-requests/{request_id}/approve",
        s.first[1],
        json={"comment": "QA ok"},
        expect=200,
    )
    assert r.json()["status"] == "open"
    assert [step["status"] for step in r.json()["steps"]] == ["completed", "in-progress"]
    r = await api.call(
        "POST",
        f"/pki/signing-requests/{request_id}/approve",
        s.release_approver,
        json={"comment": "ship it"},
        expect=200,
    )
    return dict(r.json())


@pytest.mark.parametrize(
    ("key_algorithm", "signing_algorithm", "fmt", "machine_bypass"),
    [
        ("EC_P256", "ECDSA_SHA256", "cms", False),
        ("RSA_2048", "RSASSA_PSS_SHA256", "raw", True),
    ],
    ids=["cms-ec-no-policy", "raw-rsa-machine-bypass"],
)
async def test_test_signed_artifact_resubmitted_for_release_verifies_with_openssl(
    api: Api, tmp_path: Path, key_algorithm: str, signing_algorithm: str, fmt: str, machine_bypass: bool
) -> None:
    s = await _setup(api, key_algorithm=key_algorithm, machine_bypass=machine_bypass)
    artifact = _artifact(signing_algorithm, fmt)
    test_pem = await _certificate_pem(api, s.test_signer, s.requester)
    release_pem = await _certificate_pem(api, s.release_signer, s.requester)

    # 1. Test signing: approved at once, and the signature verifies against the test certificate,
    #    which is what the test environment trusts.
    original = await _test_signed(api, s, artifact)
    assert original["steps"] == [] or all(st["status"] == "skipped" for st in original["steps"])
    if fmt == "cms":
        assert _cms_verifies(tmp_path, original["signature"], ARTIFACT, test_pem)
        assert not _cms_verifies(tmp_path, original["signature"], ARTIFACT, release_pem)
    else:
        assert _raw_verifies(tmp_path, original["signature"], ARTIFACT, test_pem, pss=True)

    # 2. Resubmission to the release signer: a new open request under the release policy.
    r = await api.call(
        "POST",
        f"/pki/signing-requests/{original['id']}/resubmit",
        s.requester,
        json={"signerId": s.release_signer["id"], "justification": "release 2.4.0"},
        expect=201,
    )
    release = r.json()
    assert release["id"] != original["id"]
    assert release["workflowId"] == f"signing-request-{release['id']}"
    assert release["status"] == "open"
    assert release["originalRequestId"] == original["id"]
    assert release["signerId"] == s.release_signer["id"]
    assert release["signingPolicyId"] == s.release_signer["signingPolicyId"]
    assert release["justification"] == "release 2.4.0"
    assert release["requesterId"] == s.requester.id
    assert [st["status"] for st in release["steps"]] == ["in-progress", "pending"]
    assert release["signature"] is None and release["grantId"] is None
    assert _canonical(release["artifact"]) == _canonical(original["artifact"])
    assert _canonical(release["origin"]) == _canonical(original["origin"]) == _canonical(ORIGIN)

    # Both ends show the link.
    assert (await _detail(api, s.requester, original["id"]))["resubmissionIds"] == [release["id"]]
    assert (await _detail(api, s.requester, release["id"]))["originalRequestId"] == original["id"]

    # 3. Approvers approve both steps; the release signature is made with the release key.
    approved = await _approve_both_steps(api, s, release["id"])
    assert approved["status"] == "approved"
    done = await _result(api, s.requester, release["id"])
    assert done["status"] == "approved"
    assert done["signature"], done
    assert done["signature"] != original["signature"]
    assert _canonical(done["artifact"]) == _canonical(original["artifact"])
    assert _canonical(done["origin"]) == _canonical(original["origin"])

    if fmt == "cms":
        assert _cms_verifies(tmp_path, done["signature"], ARTIFACT, release_pem)
        # Negative controls: another trust anchor, and a changed byte of the artifact.
        assert not _cms_verifies(tmp_path, done["signature"], ARTIFACT, test_pem)
        assert not _cms_verifies(tmp_path, done["signature"], ARTIFACT[:-1] + b"\x00", release_pem)
    else:
        assert _raw_verifies(tmp_path, done["signature"], ARTIFACT, release_pem, pss=True)
        assert not _raw_verifies(tmp_path, done["signature"], ARTIFACT, test_pem, pss=True)
        assert not _raw_verifies(tmp_path, done["signature"], ARTIFACT + b"x", release_pem, pss=True)

    # The release signature was one operation of the release request's grant.
    operations = (
        await api.call("GET", f"/pki/signers/{s.release_signer['id']}/operations", api.admin, expect=200)
    ).json()["items"]
    assert [(op["status"], op["grantId"]) for op in operations] == [("success", done["grantId"])]


async def test_resubmission_is_audited_with_its_origin(api: Api) -> None:
    s = await _setup(api)
    original = await _test_signed(api, s, _artifact("ECDSA_SHA256", "cms"))
    r = await api.call(
        "POST",
        f"/pki/signing-requests/{original['id']}/resubmit",
        s.requester,
        json={"signerId": s.release_signer["id"]},
        expect=201,
    )
    release = r.json()
    # Without a new justification the original's carries over.
    assert release["justification"] == original["justification"]
    auditor = await api.identity(scopes=["audit:read"])

    async def opened() -> dict[str, Any] | None:
        events = (
            await api.call("GET", f"/audit-events?requestId={release['id']}", auditor, expect=200)
        ).json()["items"]
        return next((e for e in events if e["action"] == "signing_request.opened"), None)

    async def recorded() -> bool:
        return await opened() is not None

    # The workflow's first activity writes the event, just after the API answered.
    await assert_eventually(recorded)
    event = await opened()
    assert event is not None
    assert event["data"]["originalRequestId"] == original["id"]
    assert event["data"]["signerId"] == s.release_signer["id"]
    assert event["data"]["artifact"]["digest"] == original["artifact"]["digest"]
    assert event["actorId"] == s.requester.id
    # The caller's own token cannot read the trail.
    await api.call("GET", f"/audit-events?requestId={release['id']}", s.requester, expect=403)


async def test_only_approved_requests_can_be_resubmitted(api: Api) -> None:
    s = await _setup(api)
    artifact = _artifact("ECDSA_SHA256", "cms")
    target = {"signerId": s.test_signer["id"]}

    open_request = await api.open_request(
        s.requester, s.release_signer["id"], artifact=artifact, origin=ORIGIN
    )
    r = await api.call(
        "POST", f"/pki/signing-requests/{open_request['id']}/resubmit", s.requester, json=target, expect=409
    )
    assert set(r.json()) == {"error", "error_description"}

    r = await api.call(
        "POST",
        f"/pki/signing-requests/{open_request['id']}/reject",
        s.first[0],
        json={"comment": "no"},
        expect=200,
    )
    assert r.json()["status"] == "rejected"
    await api.call(
        "POST", f"/pki/signing-requests/{open_request['id']}/resubmit", s.requester, json=target, expect=409
    )

    cancelled = await api.open_request(s.requester, s.release_signer["id"], artifact=artifact)
    await api.call(
        "POST", f"/pki/signing-requests/{cancelled['id']}/cancel", s.requester, json={}, expect=200
    )
    await api.call(
        "POST", f"/pki/signing-requests/{cancelled['id']}/resubmit", s.requester, json=target, expect=409
    )

    await api.call(
        "POST", "/pki/signing-requests/no-such-request/resubmit", s.requester, json=target, expect=404
    )
    # None of them gained a resubmission.
    for req in (open_request, cancelled):
        assert (await _detail(api, s.requester, req["id"]))["resubmissionIds"] == []


async def test_expired_request_cannot_be_resubmitted(api: Api) -> None:
    s = await _setup(api)
    approver = await api.identity()
    short = await api.policy([([approver], 1)], requestTtlSeconds=1)
    signer = await api.signer(members=[s.requester], policy_id=short["id"])
    req = await api.open_request(s.requester, signer["id"], artifact=_artifact("ECDSA_SHA256", "raw"))
    assert (await _result(api, s.requester, req["id"]))["status"] == "expired"
    await api.call(
        "POST",
        f"/pki/signing-requests/{req['id']}/resubmit",
        s.requester,
        json={"signerId": s.test_signer["id"]},
        expect=409,
    )


async def test_callers_rights_are_checked_against_the_new_signer(api: Api) -> None:
    s = await _setup(api)
    original = await _test_signed(api, s, _artifact("ECDSA_SHA256", "cms"))

    # Not a member of the new signer.
    closed = await api.signer(members=[s.first[0]], policy_id=s.release_signer["signingPolicyId"])
    r = await api.call(
        "POST",
        f"/pki/signing-requests/{original['id']}/resubmit",
        s.requester,
        json={"signerId": closed["id"]},
        expect=403,
    )
    assert r.json()["error"] == "not_member"

    # A token without codesign:request.
    no_request = await api.call(
        "POST",
        f"/identities/{s.requester.id}/tokens",
        api.admin,
        json={"scopes": ["codesign:sign"]},
        expect=201,
    )
    await api.call(
        "POST",
        f"/pki/signing-requests/{original['id']}/resubmit",
        headers={"Authorization": f"Bearer {no_request.json()['token']}"},
        json={"signerId": s.release_signer["id"]},
        expect=403,
    )

    # Someone who may not even see the original.
    stranger = await api.identity()
    await api.call(
        "PUT",
        f"/pki/signers/{s.release_signer['id']}/members",
        api.admin,
        json={"identityIds": [s.requester.id, stranger.id]},
        expect=200,
    )
    await api.call(
        "POST",
        f"/pki/signing-requests/{original['id']}/resubmit",
        stranger,
        json={"signerId": s.release_signer["id"]},
        expect=403,
    )

    # An unknown signer, and a key that cannot make the artifact's signature.
    await api.call(
        "POST",
        f"/pki/signing-requests/{original['id']}/resubmit",
        s.requester,
        json={"signerId": "no-such-signer"},
        expect=404,
    )
    rsa = await api.signer(members=[s.requester], key_algorithm="RSA_2048")
    r = await api.call(
        "POST",
        f"/pki/signing-requests/{original['id']}/resubmit",
        s.requester,
        json={"signerId": rsa["id"]},
        expect=400,
    )
    assert r.json()["error"] == "unsupported_algorithm"
    await api.call(
        "POST", f"/pki/signing-requests/{original['id']}/resubmit", s.requester, json={}, expect=400
    )
    assert (await _detail(api, s.requester, original["id"]))["resubmissionIds"] == []


async def test_original_request_audit_history_records_its_resubmission(api: Api) -> None:
    requester = await api.identity()
    auditor = await api.identity(scopes=["audit:read"])
    test_signer = await api.signer(members=[requester])
    release_signer = await api.signer(members=[requester])
    original = await api.open_request(requester, test_signer["id"])
    done = await api.call(
        "GET", f"/pki/signing-requests/{original['id']}/result?waitSeconds=10", requester, expect=200
    )
    assert done.json()["status"] == "approved"
    headers = {**requester.headers, "Idempotency-Key": "resubmit-once"}
    first = await api.call(
        "POST",
        f"/pki/signing-requests/{original['id']}/resubmit",
        headers=headers,
        json={"signerId": release_signer["id"]},
        expect=201,
    )
    again = await api.call(
        "POST",
        f"/pki/signing-requests/{original['id']}/resubmit",
        headers=headers,
        json={"signerId": release_signer["id"]},
        expect=201,
    )
    assert again.json()["id"] == first.json()["id"]
    events = (await api.call("GET", f"/audit-events?requestId={original['id']}", auditor, expect=200)).json()[
        "items"
    ]
    links = [e for e in events if e["action"] == "signing_request.resubmitted"]
    assert len(links) == 1
    assert links[0]["data"]["resubmissionId"] == first.json()["id"]
    assert links[0]["actorId"] == requester.id
