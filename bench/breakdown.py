"""Where one sign call's time goes, measured in this process against a running installation's
database: each step the API performs for POST /sign, called directly, one at a time.

The API's answer time at 1 client minus `sign total` is the cost of the HTTP layer (uvicorn,
routing, parsing, batching). Steps:
  sign total     store.signing.sign: signer lookup, grant consumption, signature, operation
                 record and audit event, one transaction (a batch of one)
  authenticate   store.identities.authenticate (token lookup, as other endpoints do it)
  crypto only    the key object from the key store's cache and pki.signing.sign
  raw txn        the sign path's reads and row locks (signer, grant, audit head) in the database
                 driver directly, one committed transaction, no inserts: a floor for the database
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from typing import Any

from bench.fixtures import Fixtures
from bench.servers import SigngateStack

ALGORITHMS = {"ec": "ECDSA_SHA256", "rsa": "RSASSA_PKCS1_V1_5_SHA256"}


def _per_call_us(fn: Callable[[], Any], seconds: float) -> float:
    for _ in range(20):
        fn()
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def measure(stack: SigngateStack, fx: Fixtures, alg: str, seconds: float) -> dict[str, float]:
    from api.main import build_key_store
    from core.config import Settings
    from pki.signing import sign as pki_sign
    from store import audit
    from store.db import make_engine, session_scope
    from store.identities import authenticate
    from store.signing import load_signer_key
    from store.signing import sign as store_sign

    settings = Settings(database_url=stack.database_url, master_key=stack.master_key)
    engine = make_engine(stack.database_url)
    key_store: Any = build_key_store(settings)
    signer_id = fx.signers[alg]["id"]
    who = fx.requester
    actor = audit.Actor(id=who.id, name=who.name, ip_address="127.0.0.1")
    digest = base64.b64encode(secrets.token_bytes(32)).decode()
    raw_digest = base64.b64decode(digest)
    with session_scope(engine) as session:
        key = load_signer_key(session, signer_id)
    private_key = key_store.load_cached(key.certificate_id, key.sealed_key)

    def sign_call() -> None:
        store_sign(
            engine, key_store, signer_id=signer_id, actor=actor, signing_algorithm=ALGORITHMS[alg],
            data_b64=digest, is_digest=True, client_metadata=None,
        )  # fmt: skip

    def crypto_call() -> None:
        pki_sign(
            key_store.load_cached(key.certificate_id, key.sealed_key),
            ALGORITHMS[alg],
            raw_digest,
            is_digest=True,
        )

    try:
        result = {
            "authenticate_us": _per_call_us(lambda: authenticate(engine, who.token), seconds),
            "sign_total_us": _per_call_us(sign_call, seconds),
            "crypto_only_us": _per_call_us(crypto_call, seconds),
            "raw_txn_us": _per_call_us(_raw_transaction(stack, signer_id, who.id), seconds),
        }
    finally:
        engine.dispose()
    del private_key
    return result


def _raw_transaction(stack: SigngateStack, signer_id: str, identity_id: str) -> Callable[[], None]:
    """The sign path's statements in the driver directly: the database's own share of the cost."""
    import uuid

    from core.timeutil import utcnow

    statements = [
        ("SELECT s.id, c.id, c.sealed_key FROM signers s JOIN certificates c ON c.id = s.certificate_id "
         "WHERE s.id = {p}", lambda: (signer_id,)),
        ("UPDATE grants SET used_sign_operations = used_sign_operations WHERE signer_id = {p} AND "
         "identity_id = {p} AND status = 'active' RETURNING id", lambda: (signer_id, identity_id)),
        ("UPDATE audit_head SET seq = seq WHERE id = 1 RETURNING seq, hash", lambda: ()),
    ]  # fmt: skip
    if stack.backend == "postgresql":
        import psycopg

        conn: Any = psycopg.connect(stack.database_url.replace("+psycopg", ""))
        p = "%s"

        def run() -> None:
            with conn.transaction():
                for sql, args in statements:
                    conn.execute(sql.format(p=p), args()).fetchall()
                conn.execute(f"SELECT {p}::text, {p}::timestamptz", (str(uuid.uuid4()), utcnow()))

        return run
    import sqlite3

    lite = sqlite3.connect(stack.database_url.removeprefix("sqlite:///"), isolation_level=None, timeout=30)
    lite.execute("PRAGMA synchronous=NORMAL")

    def run_sqlite() -> None:
        lite.execute("BEGIN IMMEDIATE")
        for sql, args in statements:
            lite.execute(sql.format(p="?"), args()).fetchall()
        lite.execute("COMMIT")

    return run_sqlite
