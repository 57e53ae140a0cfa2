from __future__ import annotations

from tests.conftest import Api, unique


async def test_me_and_token_revocation_takes_effect_on_next_call(api: Api) -> None:
    alice = await api.identity(scopes=["codesign:request"])
    r = await api.call("GET", "/me", alice, expect=200)
    assert r.json()["name"] == alice.name
    assert r.json()["scopes"] == ["codesign:request"]
    token_id = r.json()["tokenId"]
    await api.call("DELETE", f"/identities/{alice.id}/tokens/{token_id}", api.admin, expect=204)
    r = await api.call("GET", "/me", alice, expect=401)
    assert r.json()["error"] == "unauthorized"


async def test_duplicate_identity_name_is_409(api: Api) -> None:
    name = unique("dup")
    await api.call("POST", "/identities", api.admin, json={"name": name, "kind": "user"}, expect=201)
    r = await api.call("POST", "/identities", api.admin, json={"name": name, "kind": "user"}, expect=409)
    assert r.json()["error"] == "name_taken"


async def test_schema_errors_are_400_with_contract_body(api: Api) -> None:
    r = await api.call("POST", "/identities", api.admin, json={"name": "x", "kind": "robot"}, expect=400)
    assert set(r.json()) == {"error", "error_description"}
    assert r.json()["error"] == "invalid_request"


async def test_health_ready_and_metrics(api: Api) -> None:
    r = await api.http.get("/healthz")
    assert r.status_code == 200
    r = await api.http.get("/readyz")
    assert r.status_code == 200
    assert r.json()["database"] == "ok" and r.json()["temporal"] == "ok"
    r = await api.http.get("/metrics")
    assert r.status_code == 200
    assert "signgate_sign_operations_total" in r.text
