"""Certificates over the API: self-signed, CSR then CA-issued, PKCS#12 import; checked with openssl."""

from __future__ import annotations

import base64
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import Engine, text

from tests.conftest import Api, unique

PUBLIC_FIELDS = {
    "id",
    "name",
    "status",
    "keyAlgorithm",
    "certificatePem",
    "csrPem",
    "serialNumber",
    "notBefore",
    "notAfter",
    "extendedKeyUsages",
    "fingerprintSha256",
    "warnings",
}


def openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=input, capture_output=True, check=False)


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def audit_actions(engine: Engine, entity_id: str) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT action FROM audit_events WHERE entity_id = :e ORDER BY seq"), {"e": entity_id}
        ).all()
        conn.rollback()
    return [r[0] for r in rows]


class LocalCa:
    """A CA built in the test, issuing certificates for whatever public key it is given."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test ca {unique('ca')}")])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(
        self,
        public_key: Any,
        *,
        code_signing: bool = True,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        common_name: str = "issued",
    ) -> x509.Certificate:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(minutes=5))
            .not_valid_after(not_after or now + timedelta(days=10))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        eku = ExtendedKeyUsageOID.CODE_SIGNING if code_signing else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_for_csr(self, csr_text: str, **kw: Any) -> str:
        csr = x509.load_pem_x509_csr(csr_text.encode())
        return self.issue(csr.public_key(), **kw).public_bytes(serialization.Encoding.PEM).decode()


def pkcs12_bundle(
    password: str | None = "s3cret",
    *,
    code_signing: bool = True,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[str, ec.EllipticCurvePrivateKey, LocalCa]:
    """A base64 PKCS#12 with a fresh P-256 key, its CA-issued certificate and the CA."""
    ca = LocalCa()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(key.public_key(), code_signing=code_signing, not_before=not_before, not_after=not_after)
    encryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    blob = pkcs12.serialize_key_and_certificates(b"imported", key, cert, [ca.cert], encryption)
    return base64.b64encode(blob).decode(), key, ca


async def certificate_total(api: Api) -> int:
    r = await api.call("GET", "/pki/certificates?limit=1", api.admin, expect=200)
    return int(r.json()["total"])


async def test_self_signed_certificate_has_code_signing_eku_and_the_contract_shape(
    api: Api, engine: Engine, tmp_path: Path
) -> None:
    cert = await api.certificate("EC_P256", subject={"commonName": "release", "country": "DE"})
    assert set(cert) == PUBLIC_FIELDS
    assert cert["status"] == "active"
    assert cert["keyAlgorithm"] == "EC_P256"
    assert cert["extendedKeyUsages"] == ["codeSigning"]
    assert cert["csrPem"] is None
    assert cert["warnings"] == []
    assert len(cert["fingerprintSha256"]) == 64
    pem = write(tmp_path / "cert.pem", cert["certificatePem"])
    out = openssl("x509", "-in", str(pem), "-noout", "-ext", "extendedKeyUsage")
    assert out.returncode == 0, out.stderr
    assert b"Code Signing" in out.stdout
    out = openssl("x509", "-in", str(pem), "-noout", "-ext", "basicConstraints,keyUsage", "-serial")
    assert b"CA:FALSE" in out.stdout
    assert b"Digital Signature" in out.stdout
    assert out.stdout.split(b"serial=")[1].strip().lower().lstrip(b"0") == cert["serialNumber"].encode()
    validity = parse_time(cert["notAfter"]) - parse_time(cert["notBefore"])
    assert timedelta(days=365) <= validity <= timedelta(days=365, minutes=2)

    r = await api.call("GET", f"/pki/certificates/{cert['id']}", api.admin, expect=200)
    assert r.json() == cert
    r = await api.call("GET", f"/pki/certificates/{cert['id']}/chain", api.admin, expect=200)
    assert r.headers["content-type"].startswith("application/x-pem-file")
    assert r.text == cert["certificatePem"]
    assert audit_actions(engine, cert["id"]) == ["certificate.created"]


async def test_validity_days_sets_the_certificate_lifetime(api: Api) -> None:
    cert = await api.certificate("EC_P384", validityDays=30)
    validity = parse_time(cert["notAfter"]) - parse_time(cert["notBefore"])
    assert timedelta(days=30) <= validity <= timedelta(days=30, minutes=2)


async def test_csr_flow_issue_by_a_ca_and_install(api: Api, engine: Engine, tmp_path: Path) -> None:
    body = {
        "name": unique("csr"),
        "keyAlgorithm": "RSA_2048",
        "subject": {"commonName": "csr test", "organization": "signgate", "organizationalUnit": "ci"},
        "mode": "csr",
    }
    r = await api.call("POST", "/pki/certificates", api.admin, json=body, expect=201)
    cert = r.json()
    assert set(cert) == PUBLIC_FIELDS
    assert cert["status"] == "awaiting-certificate"
    assert cert["certificatePem"] is None
    assert cert["extendedKeyUsages"] == []
    csr_file = write(tmp_path / "req.pem", cert["csrPem"])
    out = openssl("req", "-in", str(csr_file), "-noout", "-verify", "-subject")
    assert out.returncode == 0, out.stderr
    assert b"CN=csr test" in out.stdout or b"CN = csr test" in out.stdout

    r = await api.call("GET", f"/pki/certificates/{cert['id']}/chain", api.admin, expect=409)
    assert r.json()["error"] == "certificate_not_issued"
    r = await api.call(
        "POST", "/pki/signers", api.admin, json={"name": unique("s"), "certificateId": cert["id"]}, expect=400
    )
    assert r.json()["error"] == "invalid_certificate"

    ca = LocalCa()
    issued = ca.issue_for_csr(cert["csrPem"])
    r = await api.call(
        "POST",
        f"/pki/certificates/{cert['id']}/certificate",
        api.admin,
        json={"certificatePem": issued, "chainPem": ca.pem},
        expect=200,
    )
    installed = r.json()
    assert installed["status"] == "active"
    assert installed["certificatePem"] == issued
    assert installed["extendedKeyUsages"] == ["codeSigning"]
    assert installed["serialNumber"] and installed["fingerprintSha256"]

    r = await api.call("GET", f"/pki/certificates/{cert['id']}/chain", api.admin, expect=200)
    assert r.text == issued + ca.pem
    leaf = write(tmp_path / "leaf.pem", issued)
    root = write(tmp_path / "ca.pem", ca.pem)
    out = openssl("verify", "-CAfile", str(root), str(leaf))
    assert out.returncode == 0, out.stderr

    r = await api.call(
        "POST",
        f"/pki/certificates/{cert['id']}/certificate",
        api.admin,
        json={"certificatePem": issued},
        expect=409,
    )
    assert r.json()["error"] == "certificate_not_awaiting"
    assert audit_actions(engine, cert["id"]) == ["certificate.created", "certificate.issued"]
    # The installed certificate can back a signer now.
    await api.call(
        "POST", "/pki/signers", api.admin, json={"name": unique("s"), "certificateId": cert["id"]}, expect=201
    )


async def test_installing_an_unfit_certificate_is_refused(api: Api) -> None:
    r = await api.call(
        "POST",
        "/pki/certificates",
        api.admin,
        json={
            "name": unique("csr"),
            "keyAlgorithm": "EC_P256",
            "subject": {"commonName": "x"},
            "mode": "csr",
        },
        expect=201,
    )
    cert = r.json()
    ca = LocalCa()
    other_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cases = {
        "mismatching key": ca.issue(other_key.public_key()).public_bytes(serialization.Encoding.PEM).decode(),
        "no codeSigning": ca.issue_for_csr(cert["csrPem"], code_signing=False),
        "expired": ca.issue_for_csr(
            cert["csrPem"], not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
        ),
        "malformed PEM": "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
        "not PEM": "hello",
    }
    for label, pem in cases.items():
        r = await api.call(
            "POST", f"/pki/certificates/{cert['id']}/certificate", api.admin, json={"certificatePem": pem}
        )
        assert r.status_code == 400, (label, r.text)
        assert r.json()["error"] == "invalid_certificate", label
    good = ca.issue_for_csr(cert["csrPem"])
    r = await api.call(
        "POST",
        f"/pki/certificates/{cert['id']}/certificate",
        api.admin,
        json={
            "certificatePem": good,
            "chainPem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        },
        expect=400,
    )
    assert r.json()["error"] == "invalid_certificate"
    r = await api.call("GET", f"/pki/certificates/{cert['id']}", api.admin, expect=200)
    assert r.json()["status"] == "awaiting-certificate"


async def test_pkcs12_import_warns_that_the_key_may_exist_elsewhere(api: Api, engine: Engine) -> None:
    bundle, key, ca = pkcs12_bundle("s3cret")
    name = unique("imported")
    r = await api.call(
        "POST",
        "/pki/certificates/import",
        api.admin,
        json={"name": name, "pkcs12": bundle, "password": "s3cret"},
        expect=201,
    )
    cert = r.json()
    assert set(cert) == PUBLIC_FIELDS
    assert cert["name"] == name
    assert cert["status"] == "active"
    assert cert["keyAlgorithm"] == "EC_P256"
    assert cert["extendedKeyUsages"] == ["codeSigning"]
    assert len(cert["warnings"]) == 1 and "outside this server" in cert["warnings"][0]
    loaded = x509.load_pem_x509_certificate(cert["certificatePem"].encode())
    assert loaded.public_key() == key.public_key()
    r = await api.call("GET", f"/pki/certificates/{cert['id']}/chain", api.admin, expect=200)
    assert r.text == cert["certificatePem"] + ca.pem
    assert audit_actions(engine, cert["id"]) == ["certificate.imported"]

    # Without a password, and one lacking the codeSigning EKU: imported, with a warning.
    bundle, _, _ = pkcs12_bundle(None, code_signing=False)
    r = await api.call(
        "POST",
        "/pki/certificates/import",
        api.admin,
        json={"name": unique("i"), "pkcs12": bundle},
        expect=201,
    )
    assert any("codeSigning" in w for w in r.json()["warnings"])


async def test_bad_pkcs12_is_400_invalid_pkcs12_and_stores_nothing(api: Api) -> None:
    before = await certificate_total(api)
    bundle, _, _ = pkcs12_bundle("right")
    for body in (
        {"pkcs12": bundle, "password": "wrong"},
        {"pkcs12": bundle},
        {"pkcs12": "%%% not base64 %%%", "password": "right"},
        {"pkcs12": base64.b64encode(b"garbage").decode(), "password": "right"},
    ):
        r = await api.call(
            "POST", "/pki/certificates/import", api.admin, json={"name": unique("i"), **body}, expect=400
        )
        assert r.json()["error"] == "invalid_pkcs12", body
    assert await certificate_total(api) == before


async def test_bad_create_input_is_400_and_stores_nothing(api: Api) -> None:
    before = await certificate_total(api)
    base = {"name": unique("c"), "subject": {"commonName": "x"}, "mode": "self-signed"}
    r = await api.call("POST", "/pki/certificates", api.admin, json={**base, "keyAlgorithm": "DSA_1024"})
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_algorithm")
    r = await api.call(
        "POST",
        "/pki/certificates",
        api.admin,
        json={**base, "keyAlgorithm": "EC_P256", "subject": {"commonName": "x", "country": "1X"}},
    )
    assert (r.status_code, r.json()["error"]) == (400, "invalid_subject")
    r = await api.call(
        "POST", "/pki/certificates", api.admin, json={**base, "keyAlgorithm": "EC_P256", "mode": "x"}
    )
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    r = await api.call(
        "POST", "/pki/certificates", api.admin, json={**base, "keyAlgorithm": "EC_P256", "validityDays": 0}
    )
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    assert await certificate_total(api) == before


async def test_certificates_are_admin_only_listed_and_paginated(api: Api) -> None:
    first = await api.certificate("EC_P256")
    second = await api.certificate("EC_P256")
    r = await api.call("GET", "/pki/certificates?limit=500", api.admin, expect=200)
    page = r.json()
    ids = [c["id"] for c in page["items"]]
    assert first["id"] in ids and second["id"] in ids
    assert page["total"] >= len(ids)
    assert all(set(c) == PUBLIC_FIELDS for c in page["items"])
    r = await api.call("GET", "/pki/certificates?limit=1&offset=1", api.admin, expect=200)
    assert len(r.json()["items"]) == 1 and r.json()["total"] == page["total"]
    r = await api.call("GET", "/pki/certificates?limit=501", api.admin, expect=400)

    user = await api.identity(scopes=["codesign:sign", "codesign:request", "audit:read"])
    for method, path in (
        ("GET", "/pki/certificates"),
        ("GET", f"/pki/certificates/{first['id']}"),
        ("GET", f"/pki/certificates/{first['id']}/chain"),
    ):
        r = await api.call(method, path, user, expect=403)
        assert r.json()["error"] == "forbidden"
    r = await api.call(
        "POST",
        "/pki/certificates",
        user,
        json={"name": "x", "keyAlgorithm": "EC_P256", "subject": {"commonName": "x"}, "mode": "self-signed"},
        expect=403,
    )
    await api.call("GET", "/pki/certificates", expect=401)
    r = await api.call("GET", "/pki/certificates/does-not-exist", api.admin, expect=404)
    assert r.json()["error"] == "not_found"
