"""Verifying a signature against the public key a certificate carries."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pki.certificates import parse_certificate_pem
from pki.errors import InvalidCertificate
from pki.keys import PublicKey
from pki.signing import verify


def certificate_public_key(cert: x509.Certificate) -> PublicKey:
    """The certificate's key, narrowed to the key types signgate signs with."""
    public_key = cert.public_key()
    if isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return public_key
    raise InvalidCertificate("certificate key is neither RSA nor EC")


def verify_with_certificate(
    certificate_pem: str, signing_algorithm: str, data: bytes, signature: bytes, *, is_digest: bool
) -> bool:
    """Whether `signature` is valid over `data` (or its digest) for the certificate's key."""
    public_key = certificate_public_key(parse_certificate_pem(certificate_pem))
    return verify(public_key, signing_algorithm, data, signature, is_digest=is_digest)
