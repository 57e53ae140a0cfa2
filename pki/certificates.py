"""Certificates for signing keys: self-signed, CSR-issued, or imported from PKCS#12.

Every certificate signgate signs with must carry the codeSigning extended key usage and be
inside its validity window; the checks live here so the API and the signing activity apply
the same rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.errors import InvalidCertificate, InvalidData, InvalidKey, InvalidPkcs12
from pki.keys import PrivateKey, PublicKey, as_private_key, key_algorithm_of

logger = logging.getLogger(__name__)

_BACKDATE = timedelta(minutes=1)
_MAX_NAME_LENGTH = 64  # X.520 upper bound for CN, O and OU

_EKU_NAMES: dict[x509.ObjectIdentifier, str] = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


@dataclass(frozen=True)
class Subject:
    """Distinguished name fields a signer may choose; validated so certificate building cannot fail."""

    common_name: str
    organization: str | None = None
    organizational_unit: str | None = None
    country: str | None = None

    def __post_init__(self) -> None:
        if not self.common_name or not self.common_name.strip():
            raise InvalidData("common_name must not be empty")
        for field_name, value in (
            ("common_name", self.common_name),
            ("organization", self.organization),
            ("organizational_unit", self.organizational_unit),
        ):
            if value is not None and len(value) > _MAX_NAME_LENGTH:
                raise InvalidData(f"{field_name} must be at most {_MAX_NAME_LENGTH} characters")
        if self.country is not None and not (
            len(self.country) == 2 and self.country.isascii() and self.country.isalpha()
        ):
            raise InvalidData("country must be a two-letter ISO 3166 code")

    def to_name(self) -> x509.Name:
        """X.509 name in the conventional C, O, OU, CN order."""
        attributes: list[x509.NameAttribute[str]] = []
        if self.country:
            attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, self.country.upper()))
        if self.organization:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization))
        if self.organizational_unit:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.organizational_unit))
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, self.common_name))
        return x509.Name(attributes)


@dataclass(frozen=True)
class CertificateInfo:
    """What the API shows and the store records about a certificate, without crypto types."""

    certificate_pem: str
    serial_number: str
    not_before: datetime
    not_after: datetime
    extended_key_usages: list[str]
    fingerprint_sha256: str
    key_algorithm: str
    subject_common_name: str | None


def _utcnow(now: datetime | None) -> datetime:
    """Aware UTC 'now'; an injected naive time is taken as UTC so tests can pin the clock."""
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def _certificate_hash(private_key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    """Match the hash to the curve strength so a P-384/P-521 key is not weakened by SHA-256."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if isinstance(private_key.curve, ec.SECP521R1):
            return hashes.SHA512()
        if isinstance(private_key.curve, ec.SECP384R1):
            return hashes.SHA384()
    return hashes.SHA256()


def _same_public_key(a: PublicKey | object, b: PublicKey) -> bool:
    if not isinstance(a, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return False
    encoding, fmt = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(encoding, fmt) == b.public_bytes(encoding, fmt)


def create_self_signed(
    private_key: PrivateKey, subject: Subject, validity_days: int, *, now: datetime | None = None
) -> x509.Certificate:
    """A code-signing certificate for keys that need no CA (internal tools, tests).

    notBefore is backdated a minute so verifiers with a slightly slow clock accept it at once.
    """
    if validity_days < 1:
        raise InvalidData("validity_days must be at least 1")
    key_algorithm_of(private_key)
    start = _utcnow(now)
    name = subject.to_name()
    public_key = private_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _BACKDATE)
        .not_valid_after(start + timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_digital_signature_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return builder.sign(private_key, _certificate_hash(private_key))


def _digital_signature_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def create_csr(private_key: PrivateKey, subject: Subject) -> x509.CertificateSigningRequest:
    """A CSR that asks the CA for exactly the usages signgate will check on the issued certificate."""
    key_algorithm_of(private_key)
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject.to_name())
        .add_extension(_digital_signature_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    )
    return builder.sign(private_key, _certificate_hash(private_key))


def _extended_key_usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _describe_key(cert: x509.Certificate) -> str:
    """Key algorithm name, or a plain description for keys outside our set (CA certificates)."""
    public_key = cert.public_key()
    try:
        return key_algorithm_of(public_key)
    except InvalidKey:
        if isinstance(public_key, rsa.RSAPublicKey):
            return f"RSA_{public_key.key_size}"
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            return f"EC_{public_key.curve.name}"
        return type(public_key).__name__


def describe(cert: x509.Certificate) -> CertificateInfo:
    """Flatten a certificate for storage and display (naive UTC times, lowercase hex)."""
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = common_names[0].value if common_names else None
    return CertificateInfo(
        certificate_pem=certificate_pem(cert),
        serial_number=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc.replace(tzinfo=None),
        not_after=cert.not_valid_after_utc.replace(tzinfo=None),
        extended_key_usages=[_EKU_NAMES.get(oid, oid.dotted_string) for oid in _extended_key_usages(cert)],
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        key_algorithm=_describe_key(cert),
        subject_common_name=common_name if isinstance(common_name, str) else None,
    )


def parse_chain_pem(pem: str) -> list[x509.Certificate]:
    """Parse one or more PEM certificates, in the order given; no certificate at all is an error."""
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("utf-8"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidCertificate("not a PEM certificate") from exc
    if not certs:
        raise InvalidCertificate("no certificate found")
    return certs


def parse_certificate_pem(pem: str) -> x509.Certificate:
    """Parse exactly one PEM certificate, so a pasted chain is not silently cut to its first entry."""
    certs = parse_chain_pem(pem)
    if len(certs) != 1:
        raise InvalidCertificate(f"expected one certificate, found {len(certs)}")
    return certs[0]


def has_code_signing_eku(cert: x509.Certificate) -> bool:
    """Whether verifiers (openssl cms -purpose codesign, Authenticode...) will accept the certificate."""
    return ExtendedKeyUsageOID.CODE_SIGNING in _extended_key_usages(cert)


def check_usable_for_signing(cert: x509.Certificate, *, now: datetime | None = None) -> None:
    """Refuse to sign with a certificate a verifier would reject anyway."""
    if not has_code_signing_eku(cert):
        raise InvalidCertificate("certificate lacks the codeSigning EKU")
    moment = _utcnow(now)
    if moment > cert.not_valid_after_utc:
        raise InvalidCertificate("certificate has expired")
    if moment < cert.not_valid_before_utc:
        raise InvalidCertificate("certificate is not yet valid")


def check_issued_certificate(
    cert: x509.Certificate, private_key: PrivateKey, *, now: datetime | None = None
) -> None:
    """Accept a CA-issued certificate only if it is for this key and usable for code signing."""
    if not _same_public_key(cert.public_key(), private_key.public_key()):
        raise InvalidCertificate("certificate public key does not match the signing key")
    if not has_code_signing_eku(cert):
        raise InvalidCertificate("certificate lacks the codeSigning EKU")
    if _utcnow(now) > cert.not_valid_after_utc:
        raise InvalidCertificate("certificate has expired")


def import_pkcs12(
    data: bytes, password: str | None
) -> tuple[PrivateKey, x509.Certificate, list[x509.Certificate]]:
    """Open a PKCS#12 bundle into key, leaf certificate and the remaining chain.

    Wrong password and corrupt data are not told apart: the library cannot, and the caller
    could not act differently.
    """
    secret = password.encode("utf-8") if password else None
    try:
        key, cert, additional = pkcs12.load_key_and_certificates(data, secret)
    except (ValueError, TypeError) as exc:
        logger.debug("PKCS#12 load failed: %s", exc)
        raise InvalidPkcs12("cannot open PKCS#12: wrong password or corrupt data") from exc
    if key is None:
        raise InvalidPkcs12("PKCS#12 contains no private key")
    if cert is None:
        raise InvalidPkcs12("PKCS#12 contains no certificate")
    private_key = as_private_key(key)
    if not _same_public_key(cert.public_key(), private_key.public_key()):
        raise InvalidPkcs12("PKCS#12 certificate does not match its private key")
    return private_key, cert, list(additional)


def csr_pem(csr: x509.CertificateSigningRequest) -> str:
    """PEM text to hand to a CA."""
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def certificate_pem(cert: x509.Certificate) -> str:
    """PEM text for storage and download."""
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def chain_pem(cert: x509.Certificate, chain: list[x509.Certificate]) -> str:
    """Leaf first, then the chain, without repeating the leaf if the chain already holds it."""
    parts = [certificate_pem(cert)]
    parts.extend(certificate_pem(c) for c in chain if c != cert)
    return "".join(parts)
