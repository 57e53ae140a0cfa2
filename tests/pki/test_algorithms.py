from __future__ import annotations

import pytest

from pki import (
    KEY_ALGORITHMS,
    SIGNING_ALGORITHMS,
    UnsupportedAlgorithm,
    check_algorithm,
    digest_size,
    hash_name,
    supported_algorithms,
)


def test_names_are_complete() -> None:
    assert len(KEY_ALGORITHMS) == 6
    assert len(SIGNING_ALGORITHMS) == 9


@pytest.mark.parametrize("key_algorithm", ["RSA_2048", "RSA_3072", "RSA_4096"])
def test_rsa_keys_get_the_six_rsa_algorithms(key_algorithm: str) -> None:
    algorithms = supported_algorithms(key_algorithm)
    assert len(algorithms) == 6
    assert all(a.startswith("RSASSA_") for a in algorithms)


@pytest.mark.parametrize("key_algorithm", ["EC_P256", "EC_P384", "EC_P521"])
def test_ec_keys_get_ecdsa(key_algorithm: str) -> None:
    assert supported_algorithms(key_algorithm) == ["ECDSA_SHA256", "ECDSA_SHA384", "ECDSA_SHA512"]


@pytest.mark.parametrize(
    ("signing_algorithm", "expected_hash", "size"),
    [
        ("RSASSA_PKCS1_V1_5_SHA256", "SHA256", 32),
        ("RSASSA_PSS_SHA384", "SHA384", 48),
        ("ECDSA_SHA512", "SHA512", 64),
    ],
)
def test_hash_and_digest_size(signing_algorithm: str, expected_hash: str, size: int) -> None:
    assert hash_name(signing_algorithm) == expected_hash
    assert digest_size(signing_algorithm) == size


def test_check_algorithm_accepts_fitting_pairs() -> None:
    check_algorithm("RSA_2048", "RSASSA_PSS_SHA256")
    check_algorithm("EC_P384", "ECDSA_SHA384")


@pytest.mark.parametrize(
    ("key_algorithm", "signing_algorithm"),
    [
        ("EC_P256", "RSASSA_PSS_SHA256"),
        ("RSA_2048", "ECDSA_SHA256"),
        ("RSA_2048", "RSASSA_PSS_MD5"),
        ("DSA_1024", "ECDSA_SHA256"),
        ("EC_P256", "ecdsa_sha256"),
    ],
)
def test_check_algorithm_refuses(key_algorithm: str, signing_algorithm: str) -> None:
    with pytest.raises(UnsupportedAlgorithm) as info:
        check_algorithm(key_algorithm, signing_algorithm)
    assert info.value.code == "unsupported_algorithm"


def test_unknown_names_raise() -> None:
    with pytest.raises(UnsupportedAlgorithm):
        supported_algorithms("EC_P999")
    with pytest.raises(UnsupportedAlgorithm):
        hash_name("SHA1")
