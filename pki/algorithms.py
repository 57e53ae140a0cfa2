"""Names of the key and signing algorithms signgate offers, and which fit together.

The names are part of the public API (requests, database rows), so they are closed
``Literal`` sets checked here rather than strings passed through to the crypto library.
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

from pki.errors import UnsupportedAlgorithm

KeyAlgorithm = Literal["RSA_2048", "RSA_3072", "RSA_4096", "EC_P256", "EC_P384", "EC_P521"]
KEY_ALGORITHMS: tuple[KeyAlgorithm, ...] = get_args(KeyAlgorithm)

SigningAlgorithm = Literal[
    "RSASSA_PKCS1_V1_5_SHA256",
    "RSASSA_PKCS1_V1_5_SHA384",
    "RSASSA_PKCS1_V1_5_SHA512",
    "RSASSA_PSS_SHA256",
    "RSASSA_PSS_SHA384",
    "RSASSA_PSS_SHA512",
    "ECDSA_SHA256",
    "ECDSA_SHA384",
    "ECDSA_SHA512",
]
SIGNING_ALGORITHMS: tuple[SigningAlgorithm, ...] = get_args(SigningAlgorithm)

HashName = Literal["SHA256", "SHA384", "SHA512"]
HASH_NAMES: tuple[HashName, ...] = get_args(HashName)

_DIGEST_SIZES: dict[HashName, int] = {"SHA256": 32, "SHA384": 48, "SHA512": 64}

RSA_SIGNING_ALGORITHMS: tuple[SigningAlgorithm, ...] = tuple(
    a for a in SIGNING_ALGORITHMS if a.startswith("RSASSA_")
)
EC_SIGNING_ALGORITHMS: tuple[SigningAlgorithm, ...] = tuple(
    a for a in SIGNING_ALGORITHMS if a.startswith("ECDSA_")
)


def is_pss(signing_algorithm: str) -> bool:
    """RSASSA-PSS signs with salt length = digest length and MGF1 over the same hash.

    That is what ``openssl pkeyutl -pkeyopt rsa_padding_mode:pss -pkeyopt
    rsa_pss_saltlen:digest`` verifies and what CMS verifiers expect from the parameters we
    write, so the choice is fixed rather than configurable.
    """
    return signing_algorithm.startswith("RSASSA_PSS_")


def check_key_algorithm(key_algorithm: str) -> KeyAlgorithm:
    """Narrow a stored or requested name to ``KeyAlgorithm`` so typos fail early."""
    for known in KEY_ALGORITHMS:
        if known == key_algorithm:
            return known
    raise UnsupportedAlgorithm(f"unknown key algorithm {key_algorithm!r}")


def check_signing_algorithm(signing_algorithm: str) -> SigningAlgorithm:
    """Narrow a requested name to ``SigningAlgorithm`` so typos fail early."""
    for known in SIGNING_ALGORITHMS:
        if known == signing_algorithm:
            return known
    raise UnsupportedAlgorithm(f"unknown signing algorithm {signing_algorithm!r}")


def supported_algorithms(key_algorithm: str) -> list[str]:
    """Signing algorithms a key can serve, for listing in the API and for validation."""
    family = check_key_algorithm(key_algorithm)
    if family.startswith("RSA_"):
        return list(RSA_SIGNING_ALGORITHMS)
    return list(EC_SIGNING_ALGORITHMS)


def hash_name(signing_algorithm: str) -> HashName:
    """Hash a signing algorithm commits to; clients must send digests of this hash."""
    name = check_signing_algorithm(signing_algorithm)
    suffix = name.rsplit("_", 1)[1]
    for known in HASH_NAMES:
        if known == suffix:
            return known
    raise UnsupportedAlgorithm(f"unknown hash in {signing_algorithm!r}")  # pragma: no cover


def digest_size(signing_algorithm: str) -> int:
    """Exact length a prehashed digest must have, so a truncated digest is refused."""
    return _DIGEST_SIZES[hash_name(signing_algorithm)]


def check_hash_name(name: str) -> HashName:
    """Narrow a hash name from a request to ``HashName``."""
    for known in HASH_NAMES:
        if known == name.upper():
            return known
    raise UnsupportedAlgorithm(f"unknown hash algorithm {name!r}")


def hash_digest_size(name: str) -> int:
    """Length of a digest of the named hash."""
    return _DIGEST_SIZES[check_hash_name(name)]


@functools.lru_cache(maxsize=64)
def check_algorithm(key_algorithm: str, signing_algorithm: str) -> None:
    """Refuse a signing algorithm that is unknown or cannot be used with the key. A pair that
    passes is remembered (every sign call checks one); a refusal is raised each time."""
    check_signing_algorithm(signing_algorithm)
    if signing_algorithm not in supported_algorithms(key_algorithm):
        raise UnsupportedAlgorithm(f"{signing_algorithm} cannot be used with a {key_algorithm} key")
