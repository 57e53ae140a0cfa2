"""Detached CMS from a digest, verified by `openssl cms -verify`."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asn1crypto import cms

from pki import (
    InvalidCertificate,
    InvalidData,
    PrivateKey,
    Subject,
    UnsupportedAlgorithm,
    certificate_pem,
    cms_detached_from_digest,
    create_self_signed,
    digest_file,
    hash_name,
)
from tests.pki.conftest import openssl

VERIFY = ["cms", "-verify", "-binary", "-inform", "DER", "-in", "a.p7s", "-content", "a.bin",
          "-CAfile", "cert.pem", "-purpose", "any", "-out", "/dev/null"]  # fmt: skip


@pytest.mark.parametrize(
    ("key_algorithm", "signing_algorithm"),
    [
        ("EC_P256", "ECDSA_SHA256"),
        ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA256"),
        ("RSA_2048", "RSASSA_PSS_SHA256"),
        ("EC_P384", "ECDSA_SHA384"),
        ("RSA_2048", "RSASSA_PSS_SHA512"),
    ],
)
def test_cms_verifies_with_openssl(
    key_of: Callable[[str], PrivateKey], tmp_path: Path, key_algorithm: str, signing_algorithm: str
) -> None:
    key = key_of(key_algorithm)
    cert = create_self_signed(key, Subject("cms signer"), 30)
    artifact = tmp_path / "a.bin"
    artifact.write_bytes(os.urandom(200_000))
    digest_algorithm = hash_name(signing_algorithm)
    message_digest = digest_file(artifact, digest_algorithm)

    der = cms_detached_from_digest(key, cert, [], message_digest, digest_algorithm, signing_algorithm)
    (tmp_path / "a.p7s").write_bytes(der)
    (tmp_path / "cert.pem").write_text(certificate_pem(cert))

    result = openssl(*VERIFY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    content = bytearray(artifact.read_bytes())
    content[100_000] ^= 0x01
    artifact.write_bytes(bytes(content))
    assert openssl(*VERIFY, cwd=tmp_path).returncode != 0


def test_cms_structure(key_of: Callable[[str], PrivateKey]) -> None:
    key = key_of("EC_P256")
    cert = create_self_signed(key, Subject("cms signer"), 30)
    other = create_self_signed(key_of("EC_P384"), Subject("intermediate"), 30)
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    der = cms_detached_from_digest(
        key, cert, [other], b"\x11" * 32, "SHA256", "ECDSA_SHA256", signing_time=when
    )
    info = cms.ContentInfo.load(der)
    signed_data = info["content"]
    assert info["content_type"].native == "signed_data"
    assert signed_data["encap_content_info"]["content"].native is None
    assert len(signed_data["certificates"]) == 2
    signer_info = signed_data["signer_infos"][0]
    assert signer_info["sid"].name == "issuer_and_serial_number"
    assert signer_info["sid"].chosen["serial_number"].native == cert.serial_number
    attrs = {a["type"].native: a["values"][0].native for a in signer_info["signed_attrs"]}
    assert attrs == {"content_type": "data", "signing_time": when, "message_digest": b"\x11" * 32}


def test_cms_wrong_digest_length(key_of: Callable[[str], PrivateKey]) -> None:
    key = key_of("EC_P256")
    cert = create_self_signed(key, Subject("cms signer"), 30)
    with pytest.raises(InvalidData):
        cms_detached_from_digest(key, cert, [], b"\x00" * 31, "SHA256", "ECDSA_SHA256")


def test_cms_refuses_hash_mismatch_and_wrong_key_type(key_of: Callable[[str], PrivateKey]) -> None:
    key = key_of("EC_P256")
    cert = create_self_signed(key, Subject("cms signer"), 30)
    # OpenSSL hashes signed attributes with the declared digest algorithm; a different
    # signature hash would produce a CMS no verifier accepts.
    with pytest.raises(UnsupportedAlgorithm):
        cms_detached_from_digest(key, cert, [], b"\x00" * 32, "SHA256", "ECDSA_SHA384")
    with pytest.raises(UnsupportedAlgorithm):
        cms_detached_from_digest(key, cert, [], b"\x00" * 32, "SHA256", "RSASSA_PSS_SHA256")
    with pytest.raises(UnsupportedAlgorithm):
        cms_detached_from_digest(key, cert, [], b"\x00" * 16, "MD5", "ECDSA_SHA256")


def test_cms_refuses_certificate_of_other_key(key_of: Callable[[str], PrivateKey]) -> None:
    cert = create_self_signed(key_of("EC_P384"), Subject("someone else"), 30)
    with pytest.raises(InvalidCertificate):
        cms_detached_from_digest(key_of("EC_P256"), cert, [], b"\x00" * 32, "SHA256", "ECDSA_SHA256")
