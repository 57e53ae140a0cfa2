from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki import (
    InvalidCertificate,
    InvalidData,
    InvalidKey,
    InvalidPkcs12,
    PrivateKey,
    Subject,
    certificate_pem,
    chain_pem,
    check_issued_certificate,
    check_usable_for_signing,
    create_csr,
    create_self_signed,
    csr_pem,
    describe,
    has_code_signing_eku,
    import_pkcs12,
    parse_certificate_pem,
    parse_chain_pem,
)
from tests.pki.conftest import openssl

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
SUBJECT = Subject(
    common_name="signgate test", organization="Example", organizational_unit="Build", country="DE"
)


def test_self_signed_has_code_signing_extensions(key_of: Callable[[str], PrivateKey], tmp_path: Path) -> None:
    cert = create_self_signed(key_of("EC_P256"), SUBJECT, 30)
    (tmp_path / "cert.pem").write_text(certificate_pem(cert))
    result = openssl(
        "x509",
        "-in",
        "cert.pem",
        "-noout",
        "-ext",
        "extendedKeyUsage,keyUsage,basicConstraints",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Code Signing" in result.stdout
    assert "Digital Signature" in result.stdout
    assert "CA:FALSE" in result.stdout
    assert "critical" in result.stdout
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).critical
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).critical
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert 0 < cert.serial_number < 2**159
    cert.verify_directly_issued_by(cert)


@pytest.mark.parametrize(
    ("key_algorithm", "hash_type"),
    [
        ("RSA_2048", hashes.SHA256),
        ("EC_P256", hashes.SHA256),
        ("EC_P384", hashes.SHA384),
        ("EC_P521", hashes.SHA512),
    ],
)
def test_self_signed_hash_follows_key_strength(
    key_of: Callable[[str], PrivateKey], key_algorithm: str, hash_type: type[hashes.HashAlgorithm]
) -> None:
    cert = create_self_signed(key_of(key_algorithm), SUBJECT, 1)
    assert isinstance(cert.signature_hash_algorithm, hash_type)


def test_self_signed_validity_uses_injected_clock(key_of: Callable[[str], PrivateKey]) -> None:
    cert = create_self_signed(key_of("EC_P256"), SUBJECT, 365, now=NOW)
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)
    check_usable_for_signing(cert, now=NOW)
    with pytest.raises(InvalidCertificate, match="has expired"):
        check_usable_for_signing(cert, now=NOW + timedelta(days=366))
    with pytest.raises(InvalidCertificate, match="not yet valid"):
        check_usable_for_signing(cert, now=NOW - timedelta(hours=1))


def test_describe(key_of: Callable[[str], PrivateKey]) -> None:
    cert = create_self_signed(key_of("EC_P384"), SUBJECT, 10, now=NOW)
    info = describe(cert)
    assert info.serial_number == format(cert.serial_number, "x")
    assert info.serial_number == info.serial_number.lower()
    assert info.not_before == datetime(2025, 6, 1, 11, 59)
    assert info.not_before.tzinfo is None and info.not_after.tzinfo is None
    assert info.not_after == datetime(2025, 6, 11, 12, 0)
    assert info.extended_key_usages == ["codeSigning"]
    assert info.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex()
    assert len(info.fingerprint_sha256) == 64
    assert info.key_algorithm == "EC_P384"
    assert info.subject_common_name == "signgate test"
    assert parse_certificate_pem(info.certificate_pem) == cert


def test_subject_validation() -> None:
    Subject("x", country="us")
    for country in ("USA", "U", "1A", "ÄÖ"):
        with pytest.raises(InvalidData):
            Subject("x", country=country)
    with pytest.raises(InvalidData):
        Subject("")
    with pytest.raises(InvalidData):
        Subject("x" * 65)


def test_csr_verifies_with_openssl(key_of: Callable[[str], PrivateKey], tmp_path: Path) -> None:
    for key_algorithm in ("RSA_2048", "EC_P256"):
        csr = create_csr(key_of(key_algorithm), SUBJECT)
        (tmp_path / "csr.pem").write_text(csr_pem(csr))
        result = openssl("req", "-verify", "-in", "csr.pem", "-noout", "-text", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Code Signing" in result.stdout
        assert "Digital Signature" in result.stdout
        assert "CN = signgate test" in result.stdout


def _test_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca_cert


def _issue(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    csr: x509.CertificateSigningRequest,
    *,
    eku: list[x509.ObjectIdentifier] | None,
    public_key: ec.EllipticCurvePublicKey | None = None,
    not_after: datetime = NOW + timedelta(days=365),
) -> x509.Certificate:
    ca_key, ca_cert = ca
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key or csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(not_after)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def test_check_issued_certificate(key_of: Callable[[str], PrivateKey]) -> None:
    key = key_of("EC_P256")
    csr = create_csr(key, SUBJECT)
    assert csr.is_signature_valid
    ca = _test_ca()

    good = _issue(ca, csr, eku=[ExtendedKeyUsageOID.CODE_SIGNING])
    check_issued_certificate(good, key, now=NOW)
    assert has_code_signing_eku(good)

    other = _issue(
        ca,
        csr,
        eku=[ExtendedKeyUsageOID.CODE_SIGNING],
        public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
    )
    with pytest.raises(InvalidCertificate, match="does not match"):
        check_issued_certificate(other, key, now=NOW)

    server = _issue(ca, csr, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(InvalidCertificate, match="codeSigning"):
        check_issued_certificate(server, key, now=NOW)
    assert describe(server).extended_key_usages == ["serverAuth"]

    no_eku = _issue(ca, csr, eku=None)
    with pytest.raises(InvalidCertificate, match="codeSigning"):
        check_issued_certificate(no_eku, key, now=NOW)
    with pytest.raises(InvalidCertificate, match="codeSigning"):
        check_usable_for_signing(no_eku, now=NOW)

    expired = _issue(ca, csr, eku=[ExtendedKeyUsageOID.CODE_SIGNING], not_after=NOW - timedelta(seconds=1))
    with pytest.raises(InvalidCertificate, match="expired"):
        check_issued_certificate(expired, key, now=NOW)

    chain = parse_chain_pem(chain_pem(good, [ca[1]]))
    assert chain == [good, ca[1]]
    assert parse_chain_pem(chain_pem(good, [good, ca[1]])) == [good, ca[1]]


@pytest.mark.parametrize(
    "garbage", ["", "   \n", "hello", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_garbage_pem_is_invalid_certificate(garbage: str) -> None:
    with pytest.raises(InvalidCertificate) as info:
        parse_certificate_pem(garbage)
    assert info.value.code == "invalid_certificate"
    with pytest.raises(InvalidCertificate):
        parse_chain_pem(garbage)


def test_parse_certificate_refuses_a_chain(key_of: Callable[[str], PrivateKey]) -> None:
    cert = create_self_signed(key_of("EC_P256"), SUBJECT, 1)
    with pytest.raises(InvalidCertificate, match="expected one"):
        parse_certificate_pem(chain_pem(cert, [_test_ca()[1]]))


def test_pkcs12_round_trip(key_of: Callable[[str], PrivateKey]) -> None:
    key = key_of("RSA_2048")
    cert = create_self_signed(key, SUBJECT, 30)
    ca_cert = _test_ca()[1]
    bundle = pkcs12.serialize_key_and_certificates(
        b"signer", key, cert, [ca_cert], serialization.BestAvailableEncryption(b"s3cret")
    )
    loaded_key, loaded_cert, chain = import_pkcs12(bundle, "s3cret")
    assert loaded_cert == cert
    assert chain == [ca_cert]
    assert loaded_key.private_numbers() == key.private_numbers()

    with pytest.raises(InvalidPkcs12) as info:
        import_pkcs12(bundle, "wrong")
    assert info.value.code == "invalid_pkcs12"
    with pytest.raises(InvalidPkcs12):
        import_pkcs12(bundle, None)
    with pytest.raises(InvalidPkcs12):
        import_pkcs12(b"not a pkcs12", "s3cret")


def test_pkcs12_without_password_and_incomplete(key_of: Callable[[str], PrivateKey]) -> None:
    key = key_of("EC_P256")
    cert = create_self_signed(key, SUBJECT, 30)
    plain = pkcs12.serialize_key_and_certificates(b"s", key, cert, None, serialization.NoEncryption())
    assert import_pkcs12(plain, None)[1] == cert

    key_only = pkcs12.serialize_key_and_certificates(b"s", key, None, None, serialization.NoEncryption())
    with pytest.raises(InvalidPkcs12, match="no certificate"):
        import_pkcs12(key_only, None)
    cert_only = pkcs12.serialize_key_and_certificates(b"s", None, cert, None, serialization.NoEncryption())
    with pytest.raises(InvalidPkcs12, match="no private key"):
        import_pkcs12(cert_only, None)


def test_pkcs12_with_foreign_key_type_is_invalid_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, None)
    )
    bundle = pkcs12.serialize_key_and_certificates(b"s", key, cert, None, serialization.NoEncryption())
    with pytest.raises(InvalidKey):
        import_pkcs12(bundle, None)
