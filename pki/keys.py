"""Private keys: generation, classification and sealing at rest.

Keys are stored only sealed (envelope encryption): each key has its own random data key,
and only that small data key is encrypted under the master key. Rotating the master key
therefore rewraps 60-byte blobs instead of re-encrypting every key, and a leaked data key
exposes one key only.
"""

from __future__ import annotations

import base64
import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, TypeAlias, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pki.algorithms import KeyAlgorithm, check_key_algorithm
from pki.errors import InvalidKey, KeyDecryptionError

logger = logging.getLogger(__name__)

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_RSA_SIZES: dict[int, KeyAlgorithm] = {2048: "RSA_2048", 3072: "RSA_3072", 4096: "RSA_4096"}
_EC_CURVES: dict[str, KeyAlgorithm] = {
    "secp256r1": "EC_P256",
    "secp384r1": "EC_P384",
    "secp521r1": "EC_P521",
}
_CURVE_OF: dict[KeyAlgorithm, ec.EllipticCurve] = {
    "EC_P256": ec.SECP256R1(),
    "EC_P384": ec.SECP384R1(),
    "EC_P521": ec.SECP521R1(),
}


def generate_private_key(key_algorithm: str) -> PrivateKey:
    """Generate a key of a supported algorithm; RSA uses e=65537, the only exponent in use."""
    algorithm = check_key_algorithm(key_algorithm)
    if algorithm.startswith("RSA_"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[4:]))
    return ec.generate_private_key(_CURVE_OF[algorithm])


def key_algorithm_of(key: PrivateKey | PublicKey | object) -> KeyAlgorithm:
    """Classify a key so imported keys outside the supported set are refused up front."""
    kind = _KIND_OF_TYPE.get(type(key))
    if kind is None:
        if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
            kind = "RSA"
        elif isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
            kind = "EC"
        else:
            kind = ""
        _KIND_OF_TYPE[type(key)] = kind
    if kind == "RSA":
        size = cast(rsa.RSAPrivateKey | rsa.RSAPublicKey, key).key_size
        algorithm = _RSA_SIZES.get(size)
        if algorithm is None:
            raise InvalidKey(f"RSA keys of {size} bits are not supported")
        return algorithm
    if kind == "EC":
        curve = cast(ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey, key).curve.name
        algorithm = _EC_CURVES.get(curve)
        if algorithm is None:
            raise InvalidKey(f"EC curve {curve} is not supported")
        return algorithm
    raise InvalidKey("only RSA and EC keys are supported")


# A key's class -> "RSA", "EC" or "" (unsupported): the ABC checks above cost more than an ECDSA
# signature's share of a call, and a class's answer never changes.
_KIND_OF_TYPE: dict[type, str] = {}


def as_private_key(key: object) -> PrivateKey:
    """Narrow a loaded key to the types signgate signs with."""
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        key_algorithm_of(key)
        return key
    raise InvalidKey("only RSA and EC keys are supported")


def public_key_pem(key: PrivateKey | PublicKey) -> str:
    """SubjectPublicKeyInfo PEM, the form clients need to verify signatures."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


_SEALED_MAGIC = b"SGK"
_SEALED_VERSION = 1
_NONCE_SIZE = 12
_KEY_AAD = b"signgate/v1/private-key-pkcs8"


def _data_key_aad(master_key_id: str) -> bytes:
    """Bind a wrapped data key to its purpose and its master key id, so blobs cannot be swapped."""
    return b"signgate/v1/data-key|" + master_key_id.encode("utf-8")


@dataclass(frozen=True)
class SealedKey:
    """A private key encrypted at rest, with the id of the master key that wraps its data key.

    ``wrapped_data_key`` and ``ciphertext`` are each ``nonce || AES-GCM ciphertext+tag``.
    """

    master_key_id: str
    wrapped_data_key: bytes
    ciphertext: bytes

    def to_bytes(self) -> bytes:
        """One opaque column value: magic, version, length-prefixed id and wrapped key, ciphertext."""
        key_id = self.master_key_id.encode("utf-8")
        return b"".join(
            [
                _SEALED_MAGIC,
                struct.pack(">BH", _SEALED_VERSION, len(key_id)),
                key_id,
                struct.pack(">H", len(self.wrapped_data_key)),
                self.wrapped_data_key,
                self.ciphertext,
            ]
        )

    @classmethod
    def from_bytes(cls, blob: bytes) -> SealedKey:
        """Parse ``to_bytes`` output; a malformed blob is a decryption failure for the caller."""
        try:
            if blob[:3] != _SEALED_MAGIC:
                raise ValueError("bad magic")
            version, id_len = struct.unpack_from(">BH", blob, 3)
            if version != _SEALED_VERSION:
                raise ValueError(f"unknown version {version}")
            offset = 6
            key_id = blob[offset : offset + id_len].decode("utf-8")
            offset += id_len
            (wrapped_len,) = struct.unpack_from(">H", blob, offset)
            offset += 2
            wrapped = blob[offset : offset + wrapped_len]
            offset += wrapped_len
            ciphertext = blob[offset:]
            if len(wrapped) != wrapped_len or not ciphertext:
                raise ValueError("truncated")
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            logger.debug("sealed key record is malformed: %s", exc)
            raise KeyDecryptionError() from exc
        return cls(master_key_id=key_id, wrapped_data_key=wrapped, ciphertext=ciphertext)

    def __repr__(self) -> str:
        return f"SealedKey(master_key_id={self.master_key_id!r}, ...)"


def _encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) <= _NONCE_SIZE:
        raise ValueError("ciphertext too short")
    return AESGCM(key).decrypt(blob[:_NONCE_SIZE], blob[_NONCE_SIZE:], aad)


class KeyEncryptor:
    """Envelope encryption of private keys under one AES-256-GCM master key."""

    def __init__(self, master_key: bytes, master_key_id: str = "default") -> None:
        if len(master_key) != 32:
            raise ValueError("master key must be 32 bytes (AES-256)")
        self._master_key = bytes(master_key)
        self.master_key_id = master_key_id

    def __repr__(self) -> str:
        return f"KeyEncryptor(master_key_id={self.master_key_id!r})"

    @classmethod
    def from_base64(cls, encoded: str, master_key_id: str = "default") -> KeyEncryptor:
        """Build from the base64 form settings and environment variables carry."""
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError as exc:
            raise ValueError("master key is not valid base64") from exc
        return cls(raw, master_key_id)

    def seal(self, private_key: PrivateKey) -> SealedKey:
        """Encrypt the PKCS#8 DER under a fresh data key, then wrap that data key."""
        der = private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        data_key = AESGCM.generate_key(bit_length=256)
        ciphertext = _encrypt(data_key, der, _KEY_AAD)
        wrapped = _encrypt(self._master_key, data_key, _data_key_aad(self.master_key_id))
        return SealedKey(self.master_key_id, wrapped, ciphertext)

    def _unwrap(self, sealed: SealedKey) -> bytes:
        if sealed.master_key_id != self.master_key_id:
            logger.debug(
                "sealed key uses master key %r, encryptor holds %r", sealed.master_key_id, self.master_key_id
            )
            raise KeyDecryptionError()
        try:
            return _decrypt(self._master_key, sealed.wrapped_data_key, _data_key_aad(sealed.master_key_id))
        except (InvalidTag, ValueError) as exc:
            logger.debug("data key unwrap failed: %s", type(exc).__name__)
            raise KeyDecryptionError() from exc

    def open(self, sealed: SealedKey) -> PrivateKey:
        """Decrypt a sealed key; every failure is the same opaque KeyDecryptionError."""
        data_key = self._unwrap(sealed)
        try:
            der = _decrypt(data_key, sealed.ciphertext, _KEY_AAD)
            return as_private_key(serialization.load_der_private_key(der, password=None))
        except (InvalidTag, ValueError, TypeError, InvalidKey) as exc:
            logger.debug("sealed key decryption failed: %s", type(exc).__name__)
            raise KeyDecryptionError() from exc

    def rewrap(self, sealed: SealedKey, new: KeyEncryptor) -> SealedKey:
        """Move a sealed key to another master key without touching the key ciphertext."""
        data_key = self._unwrap(sealed)
        wrapped = _encrypt(new._master_key, data_key, _data_key_aad(new.master_key_id))
        return SealedKey(new.master_key_id, wrapped, sealed.ciphertext)


class KeyStore(Protocol):
    """Where private keys live; a reference is opaque bytes the database keeps.

    A software store seals keys with a master key; a PKCS#11 store would keep the key in the
    HSM and return its handle as the reference.
    """

    def load(self, key_ref: bytes) -> PrivateKey:
        """Return the usable key for a reference made by ``store``."""
        ...

    def store(self, private_key: PrivateKey) -> bytes:
        """Persist-ready reference for a key."""
        ...


class SoftwareKeyStore:
    """KeyStore over sealed keys, with an LRU cache of opened key objects.

    Opening a sealed key costs two AES-GCM decryptions and a DER parse (and, for RSA, the
    library's key checks), far more than an ECDSA signature; the hot sign path therefore
    keeps opened keys by id.
    """

    def __init__(self, encryptor: KeyEncryptor, *, cache_size: int = 256) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.encryptor = encryptor
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[bytes, PrivateKey]] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, key_ref: bytes) -> PrivateKey:
        """Open a sealed key reference."""
        return self.encryptor.open(SealedKey.from_bytes(key_ref))

    def store(self, private_key: PrivateKey) -> bytes:
        """Seal a key into a reference for the database."""
        return self.encryptor.seal(private_key).to_bytes()

    def load_cached(self, cache_key: str, key_ref: bytes) -> PrivateKey:
        """Open a key once per cache key; a changed reference (rotation, rewrap) reopens it."""
        with self._lock:
            entry = self._cache.get(cache_key)
            if entry is not None and entry[0] == key_ref:
                self._cache.move_to_end(cache_key)
                return entry[1]
        # Decrypt outside the lock so one slow open does not stall signing with other keys.
        private_key = self.load(key_ref)
        if self._cache_size == 0:
            return private_key
        with self._lock:
            self._cache[cache_key] = (key_ref, private_key)
            self._cache.move_to_end(cache_key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return private_key

    def evict(self, cache_key: str) -> None:
        """Forget one opened key, e.g. after the key is disabled or deleted."""
        with self._lock:
            self._cache.pop(cache_key, None)

    def clear(self) -> None:
        """Forget every opened key, e.g. after a master key rotation."""
        with self._lock:
            self._cache.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)
