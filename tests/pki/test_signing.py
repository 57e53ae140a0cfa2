"""Signatures checked by openssl, for every key type and every algorithm it fits."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from pki import (
    KEY_ALGORITHMS,
    InvalidData,
    InvalidKey,
    PrivateKey,
    UnsupportedAlgorithm,
    digest,
    digest_file,
    digest_size,
    hash_name,
    sign,
    supported_algorithms,
    verify,
)
from tests.pki.conftest import openssl, write_public_key

CASES = [(k, a) for k in KEY_ALGORITHMS for a in supported_algorithms(k)]


def _pss_options(signing_algorithm: str, flag: str) -> list[str]:
    if "_PSS_" not in signing_algorithm:
        return []
    return [flag, "rsa_padding_mode:pss", flag, "rsa_pss_saltlen:digest"]


@pytest.mark.parametrize(("key_algorithm", "signing_algorithm"), CASES)
def test_digest_signature_verifies_with_openssl_pkeyutl(
    key_of: Callable[[str], PrivateKey], tmp_path: Path, key_algorithm: str, signing_algorithm: str
) -> None:
    key = key_of(key_algorithm)
    md = hash_name(signing_algorithm).lower()
    message_digest = digest(os.urandom(500), md)
    signature = sign(key, signing_algorithm, message_digest, is_digest=True)
    write_public_key(key, tmp_path / "pub.pem")
    (tmp_path / "digest.bin").write_bytes(message_digest)
    (tmp_path / "sig.bin").write_bytes(signature)
    args = [
        "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-in", "digest.bin", "-sigfile", "sig.bin",
        "-pkeyopt", f"digest:{md}", *_pss_options(signing_algorithm, "-pkeyopt"),
    ]  # fmt: skip
    result = openssl(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    tampered = bytearray(message_digest)
    tampered[0] ^= 0x01
    (tmp_path / "digest.bin").write_bytes(bytes(tampered))
    assert openssl(*args, cwd=tmp_path).returncode != 0

    assert verify(key.public_key(), signing_algorithm, message_digest, signature, is_digest=True)
    assert not verify(key.public_key(), signing_algorithm, bytes(tampered), signature, is_digest=True)


@pytest.mark.parametrize(("key_algorithm", "signing_algorithm"), CASES)
def test_data_signature_verifies_with_openssl_dgst(
    key_of: Callable[[str], PrivateKey], tmp_path: Path, key_algorithm: str, signing_algorithm: str
) -> None:
    key = key_of(key_algorithm)
    md = hash_name(signing_algorithm).lower()
    data = os.urandom(3000)
    signature = sign(key, signing_algorithm, data, is_digest=False)
    write_public_key(key, tmp_path / "pub.pem")
    (tmp_path / "data.bin").write_bytes(data)
    (tmp_path / "sig.bin").write_bytes(signature)
    args = [
        "dgst", f"-{md}", "-verify", "pub.pem", "-signature", "sig.bin",
        *_pss_options(signing_algorithm, "-sigopt"), "data.bin",
    ]  # fmt: skip
    result = openssl(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout

    tampered = bytearray(data)
    tampered[1234] ^= 0x80
    (tmp_path / "data.bin").write_bytes(bytes(tampered))
    assert openssl(*args, cwd=tmp_path).returncode != 0

    assert verify(key.public_key(), signing_algorithm, data, signature, is_digest=False)
    assert not verify(key.public_key(), signing_algorithm, bytes(tampered), signature, is_digest=False)
    # Signing the digest prehashed gives a signature that verifies over the raw data.
    prehashed = sign(key, signing_algorithm, digest(data, md), is_digest=True)
    assert verify(key.public_key(), signing_algorithm, data, prehashed, is_digest=False)


def test_pkcs1v15_is_deterministic_and_matches_prehashed(key_of: Callable[[str], PrivateKey]) -> None:
    key = key_of("RSA_2048")
    data = b"artifact"
    assert sign(key, "RSASSA_PKCS1_V1_5_SHA256", data, is_digest=False) == sign(
        key, "RSASSA_PKCS1_V1_5_SHA256", digest(data, "SHA256"), is_digest=True
    )


@pytest.mark.parametrize("length", [0, 31, 33, 48, 64])
def test_wrong_digest_length_is_invalid_data(key_of: Callable[[str], PrivateKey], length: int) -> None:
    key = key_of("EC_P256")
    with pytest.raises(InvalidData) as info:
        sign(key, "ECDSA_SHA256", b"\x00" * length, is_digest=True)
    assert info.value.code == "invalid_data"
    with pytest.raises(InvalidData):
        verify(key.public_key(), "ECDSA_SHA256", b"\x00" * length, b"sig", is_digest=True)


def test_digest_size_matches_hash() -> None:
    for algorithm in ("ECDSA_SHA256", "ECDSA_SHA384", "ECDSA_SHA512"):
        assert len(digest(b"x", hash_name(algorithm))) == digest_size(algorithm)


def test_algorithm_not_fitting_key_is_refused(key_of: Callable[[str], PrivateKey]) -> None:
    with pytest.raises(UnsupportedAlgorithm):
        sign(key_of("EC_P256"), "RSASSA_PSS_SHA256", b"\x00" * 32, is_digest=True)
    with pytest.raises(UnsupportedAlgorithm):
        sign(key_of("RSA_2048"), "ECDSA_SHA256", b"\x00" * 32, is_digest=True)
    with pytest.raises(UnsupportedAlgorithm):
        sign(key_of("RSA_2048"), "RSA_SHA1", b"data", is_digest=False)


def test_foreign_key_type_is_invalid_key() -> None:
    with pytest.raises(InvalidKey):
        sign(ed25519.Ed25519PrivateKey.generate(), "ECDSA_SHA256", b"\x00" * 32, is_digest=True)  # type: ignore[arg-type]


def test_malformed_signature_is_false(key_of: Callable[[str], PrivateKey]) -> None:
    for key_algorithm, algorithm in (("EC_P256", "ECDSA_SHA256"), ("RSA_2048", "RSASSA_PSS_SHA256")):
        public_key = key_of(key_algorithm).public_key()
        assert not verify(public_key, algorithm, b"\x00" * 32, b"garbage", is_digest=True)
        assert not verify(public_key, algorithm, b"\x00" * 32, b"", is_digest=True)


def test_digest_file_streams(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    path = tmp_path / "artifact.bin"
    path.write_bytes(data)
    for name in ("SHA256", "SHA384", "SHA512"):
        assert digest_file(path, name, chunk=1024) == digest(data, name)
    with pytest.raises(UnsupportedAlgorithm):
        digest(data, "MD5")
