"""Detached CMS (PKCS#7) signatures built from a digest the client computed.

cryptography's PKCS7 builder hashes the content itself, and signgate never sees the
artifact, so the SignedData is assembled with asn1crypto: the client's digest goes into the
message_digest signed attribute and only the DER SET of signed attributes is signed.
"""

from __future__ import annotations

from datetime import UTC, datetime

from asn1crypto import algos, cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki.algorithms import check_algorithm, check_hash_name, hash_digest_size, hash_name, is_pss
from pki.errors import InvalidCertificate, InvalidData, UnsupportedAlgorithm
from pki.keys import PrivateKey, key_algorithm_of
from pki.signing import sign

_UTC_TIME_END = datetime(2050, 1, 1, tzinfo=UTC)


def _asn1_certificate(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def _signing_time(moment: datetime) -> cms.Time:
    """UTCTime until 2049 and GeneralizedTime after, as RFC 5652 section 11.3 requires."""
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC).replace(microsecond=0)
    if moment < _UTC_TIME_END:
        return cms.Time({"utc_time": moment})
    return cms.Time({"generalized_time": moment})


def _signature_algorithm(signing_algorithm: str) -> algos.SignedDigestAlgorithm:
    """The SignerInfo signatureAlgorithm; PSS parameters match pki.signing's PSS settings."""
    hash_lower = hash_name(signing_algorithm).lower()
    if signing_algorithm.startswith("ECDSA_"):
        return algos.SignedDigestAlgorithm({"algorithm": f"{hash_lower}_ecdsa"})
    if is_pss(signing_algorithm):
        params = algos.RSASSAPSSParams(
            {
                "hash_algorithm": {"algorithm": hash_lower},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": hash_lower}},
                "salt_length": hash_digest_size(hash_lower),
                "trailer_field": "trailer_field_bc",
            }
        )
        return algos.SignedDigestAlgorithm({"algorithm": "rsassa_pss", "parameters": params})
    return algos.SignedDigestAlgorithm({"algorithm": f"{hash_lower}_rsa"})


def cms_detached_from_digest(
    private_key: PrivateKey,
    certificate: x509.Certificate,
    chain: list[x509.Certificate],
    digest: bytes,
    digest_algorithm: str,
    signing_algorithm: str,
    *,
    signing_time: datetime | None = None,
) -> bytes:
    """DER ContentInfo(SignedData) over an artifact known only by its digest.

    ``digest_algorithm`` names the artifact's digest and is what the SignerInfo declares.
    Verifiers (OpenSSL among them) hash the signed attributes with that same declared
    algorithm, and OpenSSL refuses RSASSA-PSS whose hash differs from it, so the signing
    algorithm's hash must equal the digest algorithm; a mismatch is refused here instead of
    producing a signature that no verifier accepts.
    """
    declared = check_hash_name(digest_algorithm)
    check_algorithm(key_algorithm_of(private_key), signing_algorithm)
    if hash_name(signing_algorithm) != declared:
        raise UnsupportedAlgorithm(
            f"{signing_algorithm} cannot sign a CMS over a {declared} digest; use a {declared} algorithm"
        )
    if len(digest) != hash_digest_size(declared):
        raise InvalidData(
            f"a {declared} digest is {hash_digest_size(declared)} bytes, got {len(digest)} bytes"
        )
    encoding, fmt = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(encoding, fmt) != private_key.public_key().public_bytes(
        encoding, fmt
    ):
        raise InvalidCertificate("certificate public key does not match the signing key")

    signer = _asn1_certificate(certificate)
    signed_attrs = cms.CMSAttributes(
        [
            cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
            cms.CMSAttribute(
                {"type": "signing_time", "values": [_signing_time(signing_time or datetime.now(UTC))]}
            ),
            cms.CMSAttribute({"type": "message_digest", "values": [digest]}),
        ]
    )
    signature = sign(private_key, signing_algorithm, signed_attrs.dump(), is_digest=False)

    digest_algorithm_id = algos.DigestAlgorithm({"algorithm": declared.lower()})
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": cms.IssuerAndSerialNumber(
                        {"issuer": signer.issuer, "serial_number": signer.serial_number}
                    )
                }
            ),
            "digest_algorithm": digest_algorithm_id,
            "signed_attrs": signed_attrs,
            "signature_algorithm": _signature_algorithm(signing_algorithm),
            "signature": signature,
        }
    )
    certificates = [signer] + [_asn1_certificate(c) for c in chain if c != certificate]
    signed_data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [digest_algorithm_id],
            "encap_content_info": {"content_type": "data"},
            "certificates": [cms.CertificateChoices({"certificate": c}) for c in certificates],
            "signer_infos": [signer_info],
        }
    )
    content_info = cms.ContentInfo({"content_type": "signed_data", "content": signed_data})
    der: bytes = content_info.dump()
    return der
