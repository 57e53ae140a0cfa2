"""The sign and verify API: every key type and algorithm checked with openssl, refusals, records, no leaks."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import Engine, MetaData, select
from sqlmodel import Session

from store.models import Certificate, Grant
from tests.conftest import CLIENT_IP, Api, Ident, db_backend, insert_grant, unique
from tests.test_certificates import LocalCa, openssl, pkcs12_bundle, write

KEY_TYPES = ("RSA_2048", "RSA_3072", "RSA_4096", "EC_P256", "EC_P384", "EC_P521")
RSA_ALGORITHMS = tuple(f"RSASSA_{pad}_SHA{bits}" for pad in ("PKCS1_V1_5", "PSS") for bits in (256, 384, 512))
EC_ALGORITHMS = ("ECDSA_SHA256", "ECDSA_SHA384", "ECDSA_SHA512")
PAYLOAD = b"signgate: the artifact bytes to sign"


@dataclass
class Setup:
    certificate: dict[str, Any]
    signer: dict[str, Any]
    member: Ident


@pytest.fixture(scope="module")
async def signers(api: Api) -> dict[str, Setup]:
    """One certificate and signer per key type; the only place an RSA-4096 key is generated."""
    member = await api.identity(scopes=["codesign:sign"])
    result = {}
    for key_type in KEY_TYPES:
        cert = await api.certificate(key_type)
        signer = await api.signer(members=[member], certificate_id=cert["id"])
        result[key_type] = Setup(cert, signer, member)
    return result


def hash_of(algorithm: str) -> str:
    return algorithm.rsplit("_", 1)[1].lower()


def digest(algorithm: str, data: bytes = PAYLOAD) -> bytes:
    return hashlib.new(hash_of(algorithm), data).digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def openssl_verifies(
    tmp_path: Path, certificate_pem: str, algorithm: str, message: bytes, signature: bytes, *, is_digest: bool
) -> bool:
    """openssl's verdict, against the public key taken out of the certificate."""
    cert_file = write(tmp_path / "cert.pem", certificate_pem)
    out = openssl("x509", "-in", str(cert_file), "-pubkey", "-noout")
    assert out.returncode == 0, out.stderr
    pub = write(tmp_path / "pub.pem", out.stdout)
    msg = write(tmp_path / "msg.bin", message)
    sig = write(tmp_path / "sig.bin", signature)
    pss = algorithm.startswith("RSASSA_PSS_")
    if is_digest:
        args = ["pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-in", str(msg), "-sigfile", str(sig)]
        args += ["-pkeyopt", f"digest:{hash_of(algorithm)}"]
        if pss:
            args += ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:digest"]
    else:
        args = ["dgst", f"-{hash_of(algorithm)}", "-verify", str(pub), "-signature", str(sig)]
        if pss:
            args += ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"]
        args.append(str(msg))
    return openssl(*args).returncode == 0


async def sign(api: Api, who: Ident, signer_id: str, **body: Any) -> httpx.Response:
    return await api.call("POST", f"/pki/signers/{signer_id}/sign", who, json=body)


async def operations(api: Api, signer_id: str) -> dict[str, Any]:
    r = await api.call("GET", f"/pki/signers/{signer_id}/operations?limit=500", api.admin, expect=200)
    return dict(r.json())


async def test_every_key_type_and_algorithm_verifies_with_openssl(
    api: Api, signers: dict[str, Setup], tmp_path: Path
) -> None:
    for key_type, setup in signers.items():
        algorithms = RSA_ALGORITHMS if key_type.startswith("RSA_") else EC_ALGORITHMS
        assert setup.signer["supportedAlgorithms"] == list(algorithms)
        assert setup.signer["keyAlgorithm"] == key_type
        sid = setup.signer["id"]
        for algorithm in algorithms:
            for is_digest in (False, True):
                message = digest(algorithm) if is_digest else PAYLOAD
                r = await sign(
                    api, setup.member, sid, data=b64(message), signingAlgorithm=algorithm, isDigest=is_digest
                )
                assert r.status_code == 200, (key_type, algorithm, r.text)
                answer = r.json()
                assert set(answer) == {"signature", "signingAlgorithm", "signerId", "grantId", "operationId"}
                assert answer["signingAlgorithm"] == algorithm
                assert answer["signerId"] == sid and answer["grantId"] is None
                signature = base64.b64decode(answer["signature"])
                assert openssl_verifies(
                    tmp_path, setup.certificate["certificatePem"], algorithm, message, signature,
                    is_digest=is_digest,
                ), (key_type, algorithm, is_digest)  # fmt: skip
        # A negative control: openssl rejects the last signature over other bytes.
        assert not openssl_verifies(
            tmp_path, setup.certificate["certificatePem"], algorithm, b"other" + message, signature,
            is_digest=False,
        )  # fmt: skip
        ops = await operations(api, sid)
        assert ops["total"] == 2 * len(algorithms)
        assert {o["status"] for o in ops["items"]} == {"success"}


async def test_signing_data_and_its_digest_give_interchangeable_signatures(
    api: Api, signers: dict[str, Setup]
) -> None:
    setup = signers["RSA_2048"]
    sid = setup.signer["id"]
    algorithm = "RSASSA_PKCS1_V1_5_SHA256"
    signatures = []
    for is_digest, message in ((False, PAYLOAD), (True, digest(algorithm))):
        r = await sign(
            api, setup.member, sid, data=b64(message), signingAlgorithm=algorithm, isDigest=is_digest
        )
        assert r.status_code == 200
        signatures.append(r.json()["signature"])
    # PKCS#1 v1.5 is deterministic: hashing here and prehashed input sign the same digest.
    assert signatures[0] == signatures[1]


async def test_verify_endpoint(api: Api, signers: dict[str, Setup]) -> None:
    setup = signers["EC_P384"]
    sid = setup.signer["id"]
    r = await sign(api, setup.member, sid, data=b64(PAYLOAD), signingAlgorithm="ECDSA_SHA384")
    signature = r.json()["signature"]
    body = {
        "data": b64(PAYLOAD),
        "signature": signature,
        "signingAlgorithm": "ECDSA_SHA384",
        "isDigest": False,
    }
    r = await api.call("POST", f"/pki/signers/{sid}/verify", setup.member, json=body, expect=200)
    assert r.json() == {"valid": True}
    r = await api.call("POST", f"/pki/signers/{sid}/verify", api.admin, json=body, expect=200)
    assert r.json() == {"valid": True}
    digest_body = {**body, "data": b64(digest("ECDSA_SHA384")), "isDigest": True}
    r = await api.call("POST", f"/pki/signers/{sid}/verify", setup.member, json=digest_body, expect=200)
    assert r.json() == {"valid": True}
    for changed in (
        {"data": b64(PAYLOAD + b"!")},
        {"signature": b64(b"\x30\x06\x02\x01\x01\x02\x01\x01")},
        {"signature": ""},
        {"signingAlgorithm": "ECDSA_SHA256"},
    ):
        r = await api.call(
            "POST", f"/pki/signers/{sid}/verify", setup.member, json={**body, **changed}, expect=200
        )
        assert r.json() == {"valid": False}, changed
    r = await api.call(
        "POST", f"/pki/signers/{sid}/verify", setup.member, json={**body, "signature": "!!"}, expect=400
    )
    assert r.json()["error"] == "invalid_signature"
    r = await api.call(
        "POST",
        f"/pki/signers/{sid}/verify",
        setup.member,
        json={**body, "signingAlgorithm": "RSASSA_PSS_SHA256"},
    )
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_algorithm")
    outsider = await api.identity(scopes=["codesign:sign"])
    await api.call("POST", f"/pki/signers/{sid}/verify", outsider, json=body, expect=403)


async def test_bad_input_is_400_with_a_precise_code_and_records_nothing(
    api: Api, signers: dict[str, Setup]
) -> None:
    setup = signers["EC_P256"]
    sid = setup.signer["id"]
    before = (await operations(api, sid))["total"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"data": "not base64!", "signingAlgorithm": "ECDSA_SHA256"}, "invalid_data"),
        ({"data": "YWJj=", "signingAlgorithm": "ECDSA_SHA256"}, "invalid_data"),
        ({"data": "", "signingAlgorithm": "ECDSA_SHA256"}, "invalid_data"),
        ({"data": b64(bytes(129)), "signingAlgorithm": "ECDSA_SHA256"}, "data_too_large"),
        ({"data": "A" * 100_000, "signingAlgorithm": "ECDSA_SHA256"}, "data_too_large"),
        ({"data": b64(PAYLOAD), "signingAlgorithm": "ECDSA_SHA1"}, "unsupported_algorithm"),
        ({"data": b64(PAYLOAD), "signingAlgorithm": "RSASSA_PSS_SHA256"}, "unsupported_algorithm"),
        ({"data": b64(PAYLOAD), "signingAlgorithm": "ecdsa_sha256"}, "unsupported_algorithm"),
        (
            {"data": b64(bytes(31)), "signingAlgorithm": "ECDSA_SHA256", "isDigest": True},
            "invalid_digest_length",
        ),
        (
            {"data": b64(bytes(32)), "signingAlgorithm": "ECDSA_SHA384", "isDigest": True},
            "invalid_digest_length",
        ),
        ({"data": b64(PAYLOAD), "signingAlgorithm": "ECDSA_SHA256", "isDigest": "maybe"}, "invalid_request"),
        ({"signingAlgorithm": "ECDSA_SHA256"}, "invalid_request"),
        (
            {"data": b64(PAYLOAD), "signingAlgorithm": "ECDSA_SHA256", "clientMetadata": {"x": "y" * 10_000}},
            "invalid_client_metadata",
        ),
    ]
    for body, code in cases:
        r = await sign(api, setup.member, sid, **body)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()) == {"error", "error_description"}
        assert r.json()["error"] == code, (body, r.json())
    r = await api.call("POST", f"/pki/signers/{sid}/sign", setup.member, content=b"{not json")
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    # 128 bytes exactly is accepted.
    r = await sign(api, setup.member, sid, data=b64(bytes(128)), signingAlgorithm="ECDSA_SHA256")
    assert r.status_code == 200
    assert (await operations(api, sid))["total"] == before + 1


async def test_operations_record_actor_status_digest_and_caller_ip(api: Api) -> None:
    member = await api.identity(scopes=["codesign:sign"])
    signer = await api.signer(members=[member])
    sid = signer["id"]
    metadata = {"pipeline": "release", "commit": "abc123"}
    r = await sign(
        api, member, sid, data=b64(PAYLOAD), signingAlgorithm="ECDSA_SHA256", clientMetadata=metadata
    )
    first = r.json()["operationId"]
    r = await sign(
        api, member, sid, data=b64(digest("ECDSA_SHA512")), signingAlgorithm="ECDSA_SHA512", isDigest=True
    )
    second = r.json()["operationId"]
    ops = await operations(api, sid)
    assert ops["total"] == 2
    assert [o["id"] for o in ops["items"]] == [second, first]  # newest first
    newest, oldest = ops["items"]
    assert oldest["actorId"] == member.id and oldest["actorName"] == member.name
    assert oldest["status"] == "success"
    assert oldest["signingAlgorithm"] == "ECDSA_SHA256"
    assert oldest["dataSha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    assert oldest["clientMetadata"] == metadata
    assert oldest["ipAddress"] == CLIENT_IP
    assert oldest["grantId"] is None and oldest["error"] is None
    assert oldest["at"].endswith("Z")
    assert newest["dataSha256"] == hashlib.sha256(digest("ECDSA_SHA512")).hexdigest()
    assert newest["clientMetadata"] is None
    r = await api.call("GET", f"/pki/signers/{sid}/operations?limit=1&offset=1", api.admin, expect=200)
    assert [o["id"] for o in r.json()["items"]] == [first] and r.json()["total"] == 2

    auditor = await api.identity(scopes=["audit:read"])
    await api.call("GET", f"/pki/signers/{sid}/operations", auditor, expect=200)
    await api.call("GET", f"/pki/signers/{sid}/operations", member, expect=403)
    await api.call("GET", "/pki/signers/no-such-signer/operations", api.admin, expect=404)


async def test_who_may_sign(api: Api) -> None:
    member = await api.identity(scopes=["codesign:sign"])
    member_without_scope = await api.identity(scopes=["codesign:request", "codesign:approve"])
    outsider = await api.identity(scopes=["codesign:sign"])
    signer = await api.signer(members=[member, member_without_scope])
    sid = signer["id"]
    body = {"data": b64(PAYLOAD), "signingAlgorithm": "ECDSA_SHA256", "isDigest": False}
    r = await api.call("POST", f"/pki/signers/{sid}/sign", outsider, json=body, expect=403)
    assert r.json()["error"] == "not_member"
    r = await api.call("POST", f"/pki/signers/{sid}/sign", member_without_scope, json=body, expect=403)
    assert r.json()["error"] == "forbidden"
    # Admin manages signers but does not sign with them.
    r = await api.call("POST", f"/pki/signers/{sid}/sign", api.admin, json=body, expect=403)
    await api.call("POST", f"/pki/signers/{sid}/sign", json=body, expect=401)
    await api.call("POST", "/pki/signers/no-such-signer/sign", member, json=body, expect=404)
    await api.call("POST", f"/pki/signers/{sid}/sign", member, json=body, expect=200)
    ops = await operations(api, sid)
    assert [o["actorId"] for o in ops["items"]] == [member.id]


async def test_disabled_signer_is_409_and_recorded_as_denied(api: Api) -> None:
    member = await api.identity(scopes=["codesign:sign"])
    signer = await api.signer(members=[member])
    sid = signer["id"]
    await api.call("PATCH", f"/pki/signers/{sid}", api.admin, json={"status": "disabled"}, expect=200)
    r = await sign(api, member, sid, data=b64(PAYLOAD), signingAlgorithm="ECDSA_SHA256")
    assert (r.status_code, r.json()["error"]) == (409, "signer_disabled")
    ops = await operations(api, sid)
    assert ops["total"] == 1
    denied = ops["items"][0]
    assert denied["status"] == "denied" and denied["actorId"] == member.id
    assert denied["dataSha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    assert denied["ipAddress"] == CLIENT_IP and denied["error"]
    # Bad input is still refused as such, without a record.
    r = await sign(api, member, sid, data="%%", signingAlgorithm="ECDSA_SHA256")
    assert (r.status_code, r.json()["error"]) == (400, "invalid_data")
    assert (await operations(api, sid))["total"] == 1


async def test_expired_and_not_yet_valid_certificates_are_409(api: Api, engine: Engine) -> None:
    member = await api.identity(scopes=["codesign:sign"])
    now = datetime.now(UTC)
    for field, moment, code in (
        ("not_after", now - timedelta(seconds=1), "certificate_expired"),
        ("not_before", now + timedelta(days=1), "certificate_not_yet_valid"),
    ):
        signer = await api.signer(members=[member])
        with Session(engine) as session:
            row = session.get(Certificate, signer["certificateId"])
            assert row is not None
            setattr(row, field, moment)
            session.add(row)
            session.commit()
        r = await sign(api, member, signer["id"], data=b64(PAYLOAD), signingAlgorithm="ECDSA_SHA256")
        assert (r.status_code, r.json()["error"]) == (409, code)
        ops = await operations(api, signer["id"])
        assert [o["status"] for o in ops["items"]] == ["denied"]


async def test_imported_certificate_not_yet_valid_binds_but_cannot_sign(api: Api) -> None:
    now = datetime.now(UTC)
    bundle, _, _ = pkcs12_bundle("pw", not_before=now + timedelta(days=2), not_after=now + timedelta(days=30))
    r = await api.call(
        "POST", "/pki/certificates/import", api.admin, json={"name": unique("i"), "pkcs12": bundle, "password": "pw"},
        expect=201,
    )  # fmt: skip
    member = await api.identity(scopes=["codesign:sign"])
    signer = await api.signer(members=[member], certificate_id=r.json()["id"])
    r = await sign(api, member, signer["id"], data=b64(PAYLOAD), signingAlgorithm="ECDSA_SHA256")
    assert (r.status_code, r.json()["error"]) == (409, "certificate_not_yet_valid")


async def test_policy_signer_needs_a_grant(api: Api, engine: Engine) -> None:
    member = await api.identity(scopes=["codesign:sign"])
    approver = await api.identity()
    policy = await api.policy([([approver], 1)])
    signer = await api.signer(members=[member], policy_id=policy["id"])
    sid = signer["id"]
    body = {"data": b64(PAYLOAD), "signingAlgorithm": "ECDSA_SHA256"}
    r = await sign(api, member, sid, **body)
    assert (r.status_code, r.json()["error"]) == (403, "approval_required")
    ops = await operations(api, sid)
    assert [(o["status"], o["actorId"], o["grantId"]) for o in ops["items"]] == [("denied", member.id, None)]

    grant_id = insert_grant(engine, signer_id=sid, identity_id=member.id, operations=2)
    for _ in range(2):
        r = await sign(api, member, sid, **body)
        assert r.status_code == 200, r.text
        assert r.json()["grantId"] == grant_id
    r = await sign(api, member, sid, **body)
    assert (r.status_code, r.json()["error"]) == (403, "approval_required")
    with Session(engine) as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None
        assert (grant.used_sign_operations, grant.status) == (2, "exhausted")
    ops = await operations(api, sid)
    assert [o["status"] for o in ops["items"]] == ["denied", "success", "success", "denied"]
    assert [o["grantId"] for o in ops["items"]][1:3] == [grant_id, grant_id]


def private_key_forms(key: Any) -> list[bytes]:
    """Every form in which a key's secret could leak: PKCS#8 DER, base64 of it, the secret integers."""
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    forms = [der, base64.b64encode(der)]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        secrets_ = [key.private_numbers().private_value]
        size = (key.curve.key_size + 7) // 8
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        numbers = key.private_numbers()
        secrets_ = [numbers.d, numbers.p, numbers.q]
        size = 0
    for value in secrets_:
        raw = value.to_bytes(max(size, (value.bit_length() + 7) // 8), "big")
        forms += [raw, raw.hex().encode(), base64.b64encode(raw)]
    return forms


def database_rows(engine: Engine) -> bytes:
    """Every column of every row of every table, as bytes."""
    metadata = MetaData()
    metadata.reflect(engine)
    chunks: list[bytes] = []
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)):
                for value in row:
                    chunks.append(value if isinstance(value, bytes) else str(value).encode())
        conn.rollback()
    return b"\n".join(chunks)


def database_files(engine: Engine) -> bytes:
    """The SQLite files themselves (main file, WAL): free pages and stale copies included."""
    if db_backend() != "sqlite":
        return b""
    database = Path(str(engine.url.database))
    return b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))


async def test_no_response_and_no_database_column_holds_a_private_key(
    api: Api, app: Any, engine: Engine, signers: dict[str, Setup]
) -> None:
    bodies: list[bytes] = []

    async def collect(response: httpx.Response) -> None:
        await response.aread()
        bodies.append(response.content)

    hooks = api.http.event_hooks
    api.http.event_hooks = {**hooks, "response": [*hooks.get("response", []), collect]}
    try:
        member = await api.identity(scopes=["codesign:sign"])
        certificate_ids = []
        for key_type in ("RSA_2048", "RSA_3072", "EC_P256", "EC_P384", "EC_P521"):
            cert = await api.certificate(key_type)
            certificate_ids.append(cert["id"])
            signer = await api.signer(members=[member], certificate_id=cert["id"])
            algorithm = signer["supportedAlgorithms"][0]
            r = await sign(api, member, signer["id"], data=b64(PAYLOAD), signingAlgorithm=algorithm)
            await api.call(
                "POST", f"/pki/signers/{signer['id']}/verify", member,
                json={"data": b64(PAYLOAD), "signature": r.json()["signature"], "signingAlgorithm": algorithm},
            )  # fmt: skip
            await api.call("GET", f"/pki/signers/{signer['id']}", member)
            await api.call("GET", f"/pki/signers/{signer['id']}/certificate", member)
            await api.call("GET", f"/pki/signers/{signer['id']}/operations", api.admin)
            await api.call("GET", f"/pki/certificates/{cert['id']}/chain", api.admin)
        r = await api.call(
            "POST", "/pki/certificates", api.admin,
            json={"name": unique("c"), "keyAlgorithm": "EC_P256", "subject": {"commonName": "x"}, "mode": "csr"},
        )  # fmt: skip
        csr = r.json()
        ca = LocalCa()
        await api.call(
            "POST", f"/pki/certificates/{csr['id']}/certificate", api.admin,
            json={"certificatePem": ca.issue_for_csr(csr["csrPem"]), "chainPem": ca.pem},
        )  # fmt: skip
        bundle, _, _ = pkcs12_bundle("pw")
        await api.call(
            "POST",
            "/pki/certificates/import",
            api.admin,
            json={"name": unique("i"), "pkcs12": bundle, "password": "pw"},
        )
        await api.call("GET", "/pki/certificates?limit=500", api.admin)
        await api.call("GET", "/pki/signers?limit=500", api.admin)
        for setup in signers.values():
            await api.call("GET", f"/pki/certificates/{setup.certificate['id']}", api.admin)
        await api.call("GET", "/audit-events?limit=500", api.admin)
    finally:
        api.http.event_hooks = hooks

    assert len(bodies) > 40
    key_store = app.state.ctx.key_store
    with Session(engine) as session:
        rows = session.exec(select(Certificate)).scalars().all()  # type: ignore[call-overload]
    covered = {row.key_algorithm for row in rows}
    assert covered >= set(KEY_TYPES)
    forms = [form for row in rows for form in private_key_forms(key_store.load(row.sealed_key))]
    stored, files = database_rows(engine), database_files(engine)
    # Positive controls: the scans do see what the rows hold.
    assert all(row.sealed_key in stored for row in rows)
    assert all(row.certificate_pem.encode() in stored for row in rows if row.certificate_pem)
    if db_backend() == "sqlite":
        assert all(row.fingerprint_sha256.encode() in files for row in rows if row.fingerprint_sha256)
    responses = b"\n".join(bodies)
    for haystack, where in ((stored, "database rows"), (files, "database files"), (responses, "responses")):
        assert b"PRIVATE KEY" not in haystack, where
        for form in forms:
            assert form not in haystack, where


async def test_sign_uses_cached_keys(api: Api, app: Any, signers: dict[str, Setup]) -> None:
    """Opening a sealed key is done once per certificate, not once per signature."""
    setup = signers["EC_P256"]
    key_store = app.state.ctx.key_store.open()
    calls = 0
    original: Callable[[bytes], Any] = key_store.load

    def counting_load(key_ref: bytes) -> Any:
        nonlocal calls
        calls += 1
        return original(key_ref)

    key_store.evict(setup.certificate["id"])
    key_store.load = counting_load
    try:
        for _ in range(5):
            r = await sign(
                api, setup.member, setup.signer["id"], data=b64(PAYLOAD), signingAlgorithm="ECDSA_SHA256"
            )
            assert r.status_code == 200
    finally:
        del key_store.load
    assert calls == 1
