from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pki import (
    InvalidKey,
    KeyDecryptionError,
    KeyEncryptor,
    KeyStore,
    PrivateKey,
    SealedKey,
    SoftwareKeyStore,
    UnsupportedAlgorithm,
    generate_private_key,
    key_algorithm_of,
)


def _der(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    "key_algorithm", ["RSA_2048", "RSA_3072", "RSA_4096", "EC_P256", "EC_P384", "EC_P521"]
)
def test_key_algorithm_of_generated_keys(key_of: Callable[[str], PrivateKey], key_algorithm: str) -> None:
    key = key_of(key_algorithm)
    assert key_algorithm_of(key) == key_algorithm
    assert key_algorithm_of(key.public_key()) == key_algorithm


def test_key_algorithm_of_refuses_foreign_keys() -> None:
    with pytest.raises(InvalidKey):
        key_algorithm_of(rsa.generate_private_key(65537, 1024))
    with pytest.raises(InvalidKey):
        key_algorithm_of(ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(InvalidKey):
        key_algorithm_of(object())
    with pytest.raises(UnsupportedAlgorithm):
        generate_private_key("RSA_1024")


def test_master_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        KeyEncryptor(os.urandom(16))


@pytest.mark.parametrize("key_algorithm", ["RSA_2048", "EC_P256", "EC_P521"])
def test_seal_round_trip(key_of: Callable[[str], PrivateKey], key_algorithm: str) -> None:
    key = key_of(key_algorithm)
    encryptor = KeyEncryptor(os.urandom(32), "k1")
    sealed = encryptor.seal(key)
    assert sealed.master_key_id == "k1"
    blob = sealed.to_bytes()
    restored = encryptor.open(SealedKey.from_bytes(blob))
    assert _der(restored) == _der(key)
    # No plaintext key material in the stored form.
    assert _der(key) not in blob
    assert _der(key)[-40:] not in blob
    assert b"PRIVATE KEY" not in blob
    assert SealedKey.from_bytes(blob) == sealed
    assert "wrapped" not in repr(sealed) and "ciphertext" not in repr(sealed)


def test_each_seal_uses_a_fresh_data_key(key_of: Callable[[str], PrivateKey]) -> None:
    encryptor = KeyEncryptor(os.urandom(32))
    first, second = encryptor.seal(key_of("EC_P256")), encryptor.seal(key_of("EC_P256"))
    assert first.wrapped_data_key != second.wrapped_data_key
    assert first.ciphertext != second.ciphertext


def test_wrong_master_key_fails(key_of: Callable[[str], PrivateKey]) -> None:
    sealed = KeyEncryptor(os.urandom(32)).seal(key_of("EC_P256"))
    with pytest.raises(KeyDecryptionError) as info:
        KeyEncryptor(os.urandom(32)).open(sealed)
    assert info.value.code == "key_decryption_failed"
    with pytest.raises(KeyDecryptionError):
        KeyEncryptor(os.urandom(32), "other-id").open(sealed)


@pytest.mark.parametrize("field", ["ciphertext", "wrapped_data_key"])
@pytest.mark.parametrize("position", [0, 12, -1])
def test_tampering_fails(key_of: Callable[[str], PrivateKey], field: str, position: int) -> None:
    encryptor = KeyEncryptor(os.urandom(32))
    sealed = encryptor.seal(key_of("EC_P256"))
    value = bytearray(getattr(sealed, field))
    value[position] ^= 0x01
    tampered = SealedKey(**{**sealed.__dict__, field: bytes(value)})
    with pytest.raises(KeyDecryptionError):
        encryptor.open(tampered)


def test_swapped_ciphertext_fails(key_of: Callable[[str], PrivateKey]) -> None:
    encryptor = KeyEncryptor(os.urandom(32))
    a, b = encryptor.seal(key_of("EC_P256")), encryptor.seal(key_of("EC_P384"))
    with pytest.raises(KeyDecryptionError):
        encryptor.open(SealedKey(a.master_key_id, a.wrapped_data_key, b.ciphertext))


@pytest.mark.parametrize(
    "blob", [b"", b"SGK", b"XYZ\x01\x00\x00", b"SGK\x02\x00\x00\x00\x00", b"SGK\x01\x00\x05ab"]
)
def test_malformed_blob_fails(blob: bytes) -> None:
    with pytest.raises(KeyDecryptionError):
        SealedKey.from_bytes(blob)


def test_rewrap(key_of: Callable[[str], PrivateKey]) -> None:
    key = key_of("RSA_2048")
    old, new = KeyEncryptor(os.urandom(32), "2024"), KeyEncryptor(os.urandom(32), "2025")
    sealed = old.seal(key)
    rewrapped = old.rewrap(sealed, new)
    assert rewrapped.master_key_id == "2025"
    assert rewrapped.ciphertext == sealed.ciphertext
    assert rewrapped.wrapped_data_key != sealed.wrapped_data_key
    assert _der(new.open(rewrapped)) == _der(key)
    with pytest.raises(KeyDecryptionError):
        old.open(rewrapped)
    with pytest.raises(KeyDecryptionError):
        new.rewrap(sealed, old)


def test_software_key_store_cache(key_of: Callable[[str], PrivateKey]) -> None:
    store = SoftwareKeyStore(KeyEncryptor(os.urandom(32)), cache_size=2)
    keystore: KeyStore = store
    refs = {name: keystore.store(key_of(name)) for name in ("EC_P256", "EC_P384", "EC_P521")}
    assert _der(keystore.load(refs["EC_P256"])) == _der(key_of("EC_P256"))

    first = store.load_cached("a", refs["EC_P256"])
    assert store.load_cached("a", refs["EC_P256"]) is first
    store.load_cached("b", refs["EC_P384"])
    store.load_cached("a", refs["EC_P256"])  # a is now most recent
    store.load_cached("c", refs["EC_P521"])  # evicts b
    assert len(store) == 2
    assert store.load_cached("a", refs["EC_P256"]) is first
    # A changed reference under the same id is reopened, not served stale.
    assert key_algorithm_of(store.load_cached("a", refs["EC_P384"])) == "EC_P384"

    store.evict("a")
    assert len(store) == 1
    store.clear()
    assert len(store) == 0

    with pytest.raises(KeyDecryptionError):
        store.load_cached("bad", b"garbage")
    assert len(store) == 0


def test_software_key_store_is_thread_safe(key_of: Callable[[str], PrivateKey]) -> None:
    store = SoftwareKeyStore(KeyEncryptor(os.urandom(32)), cache_size=4)
    ref = store.store(key_of("EC_P256"))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(200):
                store.load_cached(f"k{(n + i) % 8}", ref)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(store) <= 4
