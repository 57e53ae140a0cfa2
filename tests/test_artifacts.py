"""Artifact requests: the approved request signs the client's digest with one grant operation;
raw and CMS signatures checked with openssl, tampered content refused; bad input creates nothing."""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms

from tests.conftest import Api, Ident
from tests.test_certificates import openssl, write

REQUESTER_SCOPES = ["codesign:request", "codesign:sign"]
CASES = [
    ("EC_P256", "ECDSA_SHA256", "raw"),
    ("EC_P256", "ECDSA_SHA256", "cms"),
    ("RSA_2048", "RSASSA_PSS_SHA256", "raw"),
    ("RSA_2048", "RSASSA_PSS_SHA256", "cms"),
    ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA256", "raw"),
    ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA256", "cms"),
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def artifact_body(content: bytes, signing_algorithm: str, fmt: str) -> dict[str, Any]:
    return {
        "name": "a.bin",
        "digest": b64(hashlib.sha256(content).digest()),
        "digestAlgorithm": "SHA256",
        "signingAlgorithm": signing_algorithm,
        "format": fmt,
    }


async def policy_signer(api: Api, key_algorithm: str, **policy: Any) -> tuple[Ident, Ident, dict[str, Any]]:
    requester = await api.identity(scopes=REQUESTER_SCOPES)
    approver = await api.identity()
    created = await api.policy([([approver], 1)], **policy)
    signer = await api.signer(members=[requester], policy_id=created["id"], key_algorithm=key_algorithm)
    return requester, approver, signer


def cms_verifies(tmp_path: Path, signature: bytes, content: bytes, cert_pem: str) -> bool:
    p7s = write(tmp_path / "a.p7s", signature)
    data = write(tmp_path / "a.bin", content)
    cert = write(tmp_path / "cert.pem", cert_pem)
    out = openssl(
        "cms", "-verify", "-binary", "-inform", "DER", "-in", str(p7s), "-content", str(data),
        "-CAfile", str(cert), "-purpose", "any", "-out", str(tmp_path / "out.bin"),
    )  # fmt: skip
    return out.returncode == 0


def raw_verifies(tmp_path: Path, signature: bytes, digest: bytes, cert_pem: str, algorithm: str) -> bool:
    cert = write(tmp_path / "cert.pem", cert_pem)
    out = openssl("x509", "-in", str(cert), "-pubkey", "-noout")
    assert out.returncode == 0, out.stderr
    pub = write(tmp_path / "pub.pem", out.stdout)
    digest_file = write(tmp_path / "digest.bin", digest)
    sig = write(tmp_path / "sig.bin", signature)
    args = ["pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-in", str(digest_file), "-sigfile", str(sig)]
    args += ["-pkeyopt", "digest:sha256"]
    if "_PSS_" in algorithm:
        args += ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:digest"]
    return openssl(*args).returncode == 0


@pytest.mark.parametrize(("key_algorithm", "signing_algorithm", "fmt"), CASES)
async def test_approved_artifact_is_signed_and_verifies_with_openssl(
    api: Api, tmp_path: Path, key_algorithm: str, signing_algorithm: str, fmt: str
) -> None:
    requester, approver, signer = await policy_signer(api, key_algorithm)
    content = b"signgate artifact " + secrets.token_bytes(256)
    digest = hashlib.sha256(content).digest()
    req = await api.open_request(
        requester,
        signer["id"],
        artifact=artifact_body(content, signing_algorithm, fmt),
        allowedSignOperations=3,
    )
    assert req["artifact"]["format"] == fmt
    assert req["signature"] is None
    await api.call("POST", f"/pki/signing-requests/{req['id']}/approve", approver, json={}, expect=200)

    result = (
        await api.call(
            "GET", f"/pki/signing-requests/{req['id']}/result?waitSeconds=10", requester, expect=200
        )
    ).json()
    assert result["status"] == "approved"
    assert result["signingError"] is None
    assert result["signature"], result
    signature = base64.b64decode(result["signature"], validate=True)

    cert_pem = (await api.call("GET", f"/pki/signers/{signer['id']}/certificate", requester, expect=200)).text
    tampered_content = bytearray(content)
    tampered_content[len(content) // 2] ^= 0x01
    if fmt == "cms":
        assert cms_verifies(tmp_path, signature, content, cert_pem)
        assert not cms_verifies(tmp_path, signature, bytes(tampered_content), cert_pem)
        signed_data = cms.ContentInfo.load(signature)["content"]
        assert signed_data["encap_content_info"]["content"].native is None  # detached
        assert len(signed_data["certificates"]) >= 1
        attrs = {
            a["type"].native: a["values"][0].native for a in signed_data["signer_infos"][0]["signed_attrs"]
        }
        assert attrs["content_type"] == "data"
        assert attrs["message_digest"] == digest
        assert "signing_time" in attrs
    else:
        assert raw_verifies(tmp_path, signature, digest, cert_pem, signing_algorithm)
        tampered = hashlib.sha256(bytes(tampered_content)).digest()
        assert not raw_verifies(tmp_path, signature, tampered, cert_pem, signing_algorithm)

    # The signature used exactly one operation of the request's grant, recorded as a success.
    grant = (await api.call("GET", f"/pki/grants/{result['grantId']}", requester, expect=200)).json()
    assert grant["requestId"] == req["id"]
    assert grant["allowedSignOperations"] == 3
    assert grant["usedSignOperations"] == 1
    assert grant["status"] == "active"
    ops = (
        await api.call("GET", f"/pki/signers/{signer['id']}/operations?limit=500", api.admin, expect=200)
    ).json()["items"]
    assert len(ops) == 1
    op = ops[0]
    assert op["status"] == "success"
    assert op["requestId"] == req["id"]
    assert op["grantId"] == grant["id"]
    assert op["actorId"] == requester.id
    assert op["signingAlgorithm"] == signing_algorithm

    # The same request read again carries the same signature; nothing is signed twice.
    again = (await api.call("GET", f"/pki/signing-requests/{req['id']}", requester, expect=200)).json()
    assert again["signature"] == result["signature"]


async def test_machine_bypass_signs_the_artifact_without_an_approver(api: Api, tmp_path: Path) -> None:
    machine = await api.identity(kind="machine", scopes=REQUESTER_SCOPES)
    approver = await api.identity()
    policy = await api.policy([([approver], 1)], allowMachineBypass=True, maxSignings=1)
    signer = await api.signer(members=[machine], policy_id=policy["id"])
    content = secrets.token_bytes(4096)
    req = await api.open_request(
        machine, signer["id"], artifact=artifact_body(content, "ECDSA_SHA256", "cms")
    )
    result = (
        await api.call("GET", f"/pki/signing-requests/{req['id']}/result?waitSeconds=10", machine, expect=200)
    ).json()
    assert result["status"] == "approved"
    assert [s["status"] for s in result["steps"]] == ["skipped"]
    cert_pem = (await api.call("GET", f"/pki/signers/{signer['id']}/certificate", machine, expect=200)).text
    assert cms_verifies(tmp_path, base64.b64decode(result["signature"]), content, cert_pem)
    grant = (await api.call("GET", f"/pki/grants/{result['grantId']}", machine, expect=200)).json()
    assert (grant["usedSignOperations"], grant["status"]) == (1, "exhausted")


BAD_ARTIFACTS = [
    pytest.param(
        "EC_P256",
        {"digest": b64(b"\x01" * 20), "digestAlgorithm": "SHA256", "signingAlgorithm": "ECDSA_SHA256"},
        "invalid_digest_length",
        id="digest-length",
    ),
    pytest.param(
        "EC_P256",
        {"digest": b64(b"\x01" * 48), "digestAlgorithm": "SHA256", "signingAlgorithm": "ECDSA_SHA256"},
        "invalid_digest_length",
        id="digest-longer-than-its-algorithm",
    ),
    pytest.param(
        "EC_P256",
        {"digest": "not base64 at all!", "digestAlgorithm": "SHA256", "signingAlgorithm": "ECDSA_SHA256"},
        "invalid_data",
        id="bad-base64",
    ),
    pytest.param(
        "EC_P256",
        {"digest": b64(b"\x01" * 32), "digestAlgorithm": "SHA256", "signingAlgorithm": "RSASSA_PSS_SHA256"},
        "unsupported_algorithm",
        id="rsa-algorithm-on-ec-key",
    ),
    pytest.param(
        "RSA_2048",
        {"digest": b64(b"\x01" * 32), "digestAlgorithm": "SHA256", "signingAlgorithm": "ECDSA_SHA256"},
        "unsupported_algorithm",
        id="ec-algorithm-on-rsa-key",
    ),
    pytest.param(
        "EC_P256",
        {"digest": b64(b"\x01" * 48), "digestAlgorithm": "SHA384", "signingAlgorithm": "ECDSA_SHA256"},
        "unsupported_algorithm",
        id="digest-algorithm-not-the-signing-hash",
    ),
    pytest.param(
        "RSA_2048",
        {"digest": b64(b"\x01" * 32), "digestAlgorithm": "SHA256", "signingAlgorithm": "RSASSA_PSS_SHA512"},
        "unsupported_algorithm",
        id="signing-hash-not-the-digest-algorithm",
    ),
    pytest.param(
        "EC_P256",
        {"digest": b64(b"\x01" * 32), "digestAlgorithm": "MD5", "signingAlgorithm": "ECDSA_SHA256"},
        None,
        id="unknown-digest-algorithm",
    ),
    pytest.param(
        "EC_P256",
        {
            "digest": b64(b"\x01" * 32),
            "digestAlgorithm": "SHA256",
            "signingAlgorithm": "ECDSA_SHA256",
            "format": "zip",
        },
        None,
        id="unknown-format",
    ),
]


@pytest.mark.parametrize(("key_algorithm", "artifact", "error"), BAD_ARTIFACTS)
async def test_bad_artifact_input_is_refused_and_creates_nothing(
    api: Api, key_algorithm: str, artifact: dict[str, Any], error: str | None
) -> None:
    requester, _approver, signer = await policy_signer(api, key_algorithm)
    r = await api.call(
        "POST", "/pki/signing-requests", requester, json={"signerId": signer["id"], "artifact": artifact}
    )
    assert r.status_code == 400, r.text
    if error is not None:
        assert r.json()["error"] == error
    assert r.json()["error_description"]
    requests = await api.call("GET", f"/pki/signing-requests?signerId={signer['id']}", api.admin, expect=200)
    assert requests.json()["total"] == 0
    grants = await api.call("GET", f"/pki/grants?signerId={signer['id']}", api.admin, expect=200)
    assert grants.json()["total"] == 0
    ops = await api.call("GET", f"/pki/signers/{signer['id']}/operations", api.admin, expect=200)
    assert ops.json()["total"] == 0
