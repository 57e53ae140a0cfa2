"""Error tree of the pki package.

Each error carries a stable snake_case ``code`` so the API and the activities can translate
it without parsing messages; the message is safe to show to a caller.
"""

from __future__ import annotations


class PkiError(Exception):
    """Base of every failure the pki package reports on purpose."""

    code: str = "pki_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidCertificate(PkiError):
    """A certificate is unparsable or unfit for code signing."""

    code = "invalid_certificate"


class InvalidKey(PkiError):
    """A key is unparsable or of a type and size signgate does not manage."""

    code = "invalid_key"


class InvalidPkcs12(PkiError):
    """A PKCS#12 bundle cannot be opened or lacks a key or a certificate."""

    code = "invalid_pkcs12"


class UnsupportedAlgorithm(PkiError):
    """An algorithm name is unknown or does not fit the key it is asked of."""

    code = "unsupported_algorithm"


class InvalidData(PkiError):
    """Caller-supplied input (digest length, subject field...) is malformed."""

    code = "invalid_data"


class SigningError(PkiError):
    """A signature could not be made.

    Deliberately opaque: the message never describes the key or the library failure, which
    go to the debug log instead, so a caller learns nothing about key material.
    """

    code = "signing_failed"

    def __init__(self, message: str = "signing failed") -> None:
        super().__init__(message)


class KeyDecryptionError(PkiError):
    """A sealed key cannot be opened: wrong master key, tampering or a corrupt record.

    The causes are not told apart, so the error is no oracle for an attacker.
    """

    code = "key_decryption_failed"

    def __init__(self, message: str = "key decryption failed") -> None:
        super().__init__(message)
