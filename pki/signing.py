"""Raw signatures over data or a client-computed digest.

Clients usually send only a digest, so the artifact never reaches the server; the digest is
then signed as-is (prehashed), which yields the same signature as hashing the data here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from pki.algorithms import check_algorithm, check_hash_name, digest_size, hash_name, is_pss
from pki.errors import InvalidData, PkiError, SigningError
from pki.keys import PrivateKey, PublicKey, key_algorithm_of

logger = logging.getLogger(__name__)

_HASHES: dict[str, type[hashes.SHA256] | type[hashes.SHA384] | type[hashes.SHA512]] = {
    "SHA256": hashes.SHA256,
    "SHA384": hashes.SHA384,
    "SHA512": hashes.SHA512,
}


def hash_algorithm(name: str) -> hashes.HashAlgorithm:
    """cryptography hash object for one of our hash names."""
    return _HASHES[check_hash_name(name)]()


def _prepare(
    key: PrivateKey | PublicKey, signing_algorithm: str, data: bytes, is_digest: bool
) -> tuple[hashes.HashAlgorithm | utils.Prehashed, hashes.HashAlgorithm]:
    """Check the request and pick the hash argument the library needs (plain or prehashed)."""
    prepared, algorithm, expected = _plan(key_algorithm_of(key), signing_algorithm, is_digest)
    if expected is not None and len(data) != expected:
        raise InvalidData(f"{signing_algorithm} needs a {expected}-byte digest, got {len(data)} bytes")
    return prepared, algorithm


@functools.lru_cache(maxsize=64)
def _plan(
    key_algorithm: str, signing_algorithm: str, is_digest: bool
) -> tuple[hashes.HashAlgorithm | utils.Prehashed, hashes.HashAlgorithm, int | None]:
    """`_prepare`'s checks and hash objects for one kind of request, made once (a refusal is
    raised each time, never kept): the hash argument, the hash, the digest length required."""
    check_algorithm(key_algorithm, signing_algorithm)
    algorithm = hash_algorithm(hash_name(signing_algorithm))
    if is_digest:
        return utils.Prehashed(algorithm), algorithm, digest_size(signing_algorithm)
    return algorithm, algorithm, None


def pss_padding(algorithm: hashes.HashAlgorithm) -> padding.PSS:
    """PSS with MGF1 over the signature hash and salt length = digest length.

    This is what ``openssl pkeyutl -pkeyopt rsa_padding_mode:pss -pkeyopt
    rsa_pss_saltlen:digest`` and the CMS RSASSA-PSS parameters we emit describe.
    """
    return padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)


def sign(private_key: PrivateKey, signing_algorithm: str, data: bytes, *, is_digest: bool) -> bytes:
    """Sign data, or a digest of it, with a key; ECDSA signatures are DER as openssl expects.

    Request errors (algorithm, digest length) surface as such; any library failure becomes an
    opaque SigningError so nothing about the key reaches the caller.
    """
    prepared, algorithm = _prepare(private_key, signing_algorithm, data, is_digest)
    try:
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            return private_key.sign(data, ec.ECDSA(prepared))
        if isinstance(private_key, rsa.RSAPrivateKey):
            pad: padding.AsymmetricPadding = (
                pss_padding(algorithm) if is_pss(signing_algorithm) else padding.PKCS1v15()
            )
            return private_key.sign(data, pad, prepared)
    except PkiError:
        raise
    except Exception as exc:
        logger.debug("signature with %s failed: %s", signing_algorithm, type(exc).__name__)
        raise SigningError() from exc
    raise SigningError()  # pragma: no cover - key_algorithm_of admits only RSA and EC


def verify(
    public_key: PublicKey, signing_algorithm: str, data: bytes, signature: bytes, *, is_digest: bool
) -> bool:
    """Check a signature; a bad or malformed signature is simply False, not an error."""
    prepared, algorithm = _prepare(public_key, signing_algorithm, data, is_digest)
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(prepared))
            return True
        if isinstance(public_key, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                pss_padding(algorithm) if is_pss(signing_algorithm) else padding.PKCS1v15()
            )
            public_key.verify(signature, data, pad, prepared)
            return True
    except (InvalidSignature, ValueError):
        return False
    return False  # pragma: no cover - key_algorithm_of admits only RSA and EC


def digest(data: bytes, hash_name: str) -> bytes:
    """Digest in memory, with the same names as the signing algorithms use."""
    return hashlib.new(check_hash_name(hash_name).lower(), data).digest()


def digest_file(path: str | os.PathLike[str], hash_name: str, chunk: int = 1 << 20) -> bytes:
    """Digest a file in chunks so artifacts of any size need constant memory."""
    hasher = hashlib.new(check_hash_name(hash_name).lower())
    with open(path, "rb") as artifact:
        while block := artifact.read(chunk):
            hasher.update(block)
    return hasher.digest()
