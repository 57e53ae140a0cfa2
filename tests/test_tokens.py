"""API tokens: shown once, stored as a SHA-256 hash, 256 random bits, revoked and expired at once."""

from __future__ import annotations

import base64
import hashlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from store.identities import TOKEN_PREFIX, authenticate
from tests.conftest import Api, Ident, unique
from tests.test_authz_matrix import expire_token


def api_token_rows(engine: Engine, identity_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM api_tokens WHERE identity_id = :id"), {"id": identity_id}
        ).mappings()
        return [dict(r) for r in rows]


async def new_token(api: Api, identity_id: str, scopes: list[str], **extra: Any) -> dict[str, Any]:
    r = await api.call(
        "POST",
        f"/identities/{identity_id}/tokens",
        api.admin,
        json={"scopes": scopes, **extra},
        expect=201,
    )
    return dict(r.json())


def random_part(token: str) -> bytes:
    assert token.startswith(TOKEN_PREFIX)
    encoded = token[len(TOKEN_PREFIX) :]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))


async def test_token_is_shown_once_and_only_its_hash_is_stored(api: Api, engine: Engine) -> None:
    alice = await api.identity(unique("alice"), scopes=["codesign:request"])
    issued = await new_token(api, alice.id, ["audit:read", "codesign:sign"])
    token = issued["token"]
    assert set(issued) == {"id", "token", "scopes", "expiresAt"}
    assert issued["scopes"] == ["audit:read", "codesign:sign"]
    assert issued["expiresAt"] is None

    for path in (f"/identities/{alice.id}", "/identities?limit=500", "/me"):
        r = await api.call("GET", path, api.admin, expect=200)
        assert token not in r.text
        assert alice.token not in r.text
    r = await api.call("GET", "/me", Ident(alice.id, alice.name, token), expect=200)
    assert token not in r.text
    r = await api.call("GET", f"/audit-events?entityId={alice.id}", api.admin, expect=200)
    assert r.json()["total"] >= 2
    assert token not in r.text and hashlib.sha256(token.encode()).hexdigest() not in r.text

    rows = {row["id"]: row for row in api_token_rows(engine, alice.id)}
    assert set(rows) == {issued["id"], (await api.call("GET", "/me", alice)).json()["tokenId"]}
    row = rows[issued["id"]]
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    for stored in rows.values():
        assert all(token not in str(value) for value in stored.values())
        assert all(alice.token not in str(value) for value in stored.values())


async def test_tokens_carry_at_least_256_random_bits(api: Api) -> None:
    bob = await api.identity(unique("bob"), scopes=["audit:read"])
    tokens = [(await new_token(api, bob.id, ["audit:read"]))["token"] for _ in range(32)]
    assert len(set(tokens)) == len(tokens)
    randoms = [random_part(t) for t in tokens]
    assert all(len(r) >= 32 for r in randoms)
    # The bits are not constant or patterned: over 32 tokens of 256 bits about half are set, and every
    # bit position varies between tokens.
    bits = "".join(f"{byte:08b}" for r in randoms for byte in r[:32])
    assert 0.45 < bits.count("1") / len(bits) < 0.55
    positions = [{f"{int.from_bytes(r[:32], 'big'):0256b}"[i] for r in randoms} for i in range(256)]
    assert sum(len(p) == 2 for p in positions) > 250


async def test_revoked_token_is_refused_on_the_very_next_call(api: Api) -> None:
    carol = await api.identity(unique("carol"), scopes=["audit:read"])
    second = await new_token(api, carol.id, ["audit:read"])
    other = Ident(carol.id, carol.name, second["token"])
    me = await api.call("GET", "/me", carol, expect=200)
    await api.call("GET", "/audit-events/verify", carol, expect=200)
    await api.call("DELETE", f"/identities/{carol.id}/tokens/{me.json()['tokenId']}", api.admin, expect=204)
    r = await api.call("GET", "/audit-events/verify", carol, expect=401)
    assert r.json()["error"] == "unauthorized"
    await api.call("GET", "/me", carol, expect=401)
    # Only that token: the identity's other token still works.
    await api.call("GET", "/me", other, expect=200)
    # Revoking again changes nothing and still answers 204.
    await api.call("DELETE", f"/identities/{carol.id}/tokens/{me.json()['tokenId']}", api.admin, expect=204)


async def test_a_token_can_revoke_itself_only_through_an_admin(api: Api) -> None:
    """Revocation is an admin call; a token's own holder without admin gets a 403."""
    dave = await api.identity(unique("dave"), scopes=["codesign:sign"])
    token_id = (await api.call("GET", "/me", dave, expect=200)).json()["tokenId"]
    await api.call("DELETE", f"/identities/{dave.id}/tokens/{token_id}", dave, expect=403)
    await api.call("GET", "/me", dave, expect=200)


async def test_expired_token_is_refused(api: Api, engine: Engine) -> None:
    erin = await api.identity(unique("erin"), scopes=["audit:read"])
    issued = await new_token(api, erin.id, ["audit:read"], ttlSeconds=60)
    expires_at = datetime.fromisoformat(issued["expiresAt"].replace("Z", "+00:00"))
    assert timedelta(seconds=55) < expires_at - datetime.now(UTC) <= timedelta(seconds=60)
    holder = Ident(erin.id, erin.name, issued["token"])
    await api.call("GET", "/me", holder, expect=200)
    expire_token(engine, issued["id"])
    r = await api.call("GET", "/me", holder, expect=401)
    assert r.json() == (await api.call("GET", "/me", None, expect=401)).json()


async def test_expiry_boundary_with_an_injected_clock(api: Api, engine: Engine) -> None:
    frank = await api.identity(unique("frank"), scopes=["audit:read"])
    issued = await new_token(api, frank.id, ["audit:read"], ttlSeconds=3600)
    expires_at = datetime.fromisoformat(issued["expiresAt"].replace("Z", "+00:00"))
    token = issued["token"]
    assert authenticate(engine, token, now=expires_at - timedelta(seconds=1)) is not None
    assert authenticate(engine, token, now=expires_at) is None
    assert authenticate(engine, token, now=expires_at + timedelta(days=1)) is None


@pytest.mark.parametrize("ttl", [0, 59, -1, "soon"])
async def test_ttl_below_the_minimum_is_400(api: Api, ttl: Any) -> None:
    grace = await api.identity(unique("grace"), scopes=["audit:read"])
    r = await api.call(
        "POST",
        f"/identities/{grace.id}/tokens",
        api.admin,
        json={"scopes": ["audit:read"], "ttlSeconds": ttl},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request"


@pytest.mark.parametrize("scopes", [[], ["root"], ["admin", "codesign:everything"]])
async def test_unknown_or_missing_scopes_are_400(api: Api, scopes: list[str]) -> None:
    heidi = await api.identity(unique("heidi"), scopes=["audit:read"])
    r = await api.call("POST", f"/identities/{heidi.id}/tokens", api.admin, json={"scopes": scopes})
    assert r.status_code == 400, r.text


async def test_token_for_an_unknown_identity_is_404(api: Api) -> None:
    await api.call(
        "POST", "/identities/no-such-identity/tokens", api.admin, json={"scopes": ["audit:read"]}, expect=404
    )


async def test_delete_of_an_unknown_token_is_404(api: Api) -> None:
    ivan = await api.identity(unique("ivan"), scopes=["audit:read"])
    r = await api.call("DELETE", f"/identities/{ivan.id}/tokens/no-such-token", api.admin, expect=404)
    assert set(r.json()) == {"error", "error_description"}
    await api.call("DELETE", f"/identities/no-such-identity/tokens/{ivan.id}", api.admin, expect=404)


async def test_a_token_cannot_be_revoked_through_another_identitys_path(api: Api) -> None:
    judy = await api.identity(unique("judy"), scopes=["audit:read"])
    mallory = await api.identity(unique("mallory"), scopes=["audit:read"])
    judy_token_id = (await api.call("GET", "/me", judy, expect=200)).json()["tokenId"]
    await api.call("DELETE", f"/identities/{mallory.id}/tokens/{judy_token_id}", api.admin, expect=404)
    await api.call("GET", "/me", judy, expect=200)
    await api.call("GET", "/me", mallory, expect=200)


async def test_me_shows_identity_and_scopes(api: Api) -> None:
    kim = await api.identity(unique("kim"), kind="machine", scopes=["codesign:sign", "codesign:request"])
    r = await api.call("GET", "/me", kim, expect=200)
    me = r.json()
    assert me["id"] == kim.id and me["name"] == kim.name and me["kind"] == "machine"
    assert me["scopes"] == ["codesign:request", "codesign:sign"]
    assert "token" not in me
    r = await api.call("GET", "/me", api.admin, expect=200)
    assert r.json()["scopes"] == ["admin", "audit:read"]


async def test_tokens_never_reach_the_logs(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        logger = logging.getLogger(name)
        if not logger.propagate:
            logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG):
            leo = await api.identity(unique("leo"), scopes=["codesign:request", "audit:read"])
            issued = await new_token(api, leo.id, ["audit:read"])
            second = Ident(leo.id, leo.name, issued["token"])
            token_id = (await api.call("GET", "/me", leo, expect=200)).json()["tokenId"]
            await api.call("GET", "/audit-events/verify", second, expect=200)
            await api.call("GET", "/identities", second, expect=403)
            await api.call("POST", "/pki/signing-requests", leo, json={"signerId": "nope"})
            # A request through Temporal and the worker, so their loggers take part too.
            signer = await api.signer(members=[leo])
            request = await api.open_request(leo, signer["id"])
            await api.call(
                "GET", f"/pki/signing-requests/{request['id']}/result?waitSeconds=10", leo, expect=200
            )
            await api.call("POST", "/pki/signing-requests", leo, content=b"{not json")
            await api.call("DELETE", f"/identities/{leo.id}/tokens/{token_id}", api.admin, expect=204)
            await api.call("GET", "/me", leo, expect=401)
            await api.call("GET", "/me", None, headers={"Authorization": f"Bearer {leo.token}x"}, expect=401)
    finally:
        for name in list(logging.root.manager.loggerDict):
            logger = logging.getLogger(name)
            if caplog.handler in logger.handlers:
                logger.removeHandler(caplog.handler)
    assert caplog.records, "nothing was logged: the capture is not working"
    secrets_seen = (leo.token, issued["token"], api.admin.token)
    for record in caplog.records:
        rendered = " ".join([record.getMessage(), str(record.args), str(record.exc_text), str(vars(record))])
        for secret in secrets_seen:
            assert secret not in rendered, f"token in a log record from {record.name}"
    for secret in secrets_seen:
        assert secret not in caplog.text
