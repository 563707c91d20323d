"""Key scopes across tenants, through HTTP on PostgreSQL + Redis: a tenant admin manages its own
tenant's keys and nothing else; tenants and operator keys come from the operator."""

from __future__ import annotations

import httpx
import psycopg
import pytest


@pytest.fixture(scope="module")
def tenants(pg_stack):
    """Admin and member keys of two tenants, and an operator; made with the server-side CLI."""
    make = pg_stack.create_key
    keys = {"a_admin": make("ten-a", admin=True), "a_member": make("ten-a"),
            "b_admin": make("ten-b", admin=True), "b_member": make("ten-b")}
    clients = {name: pg_stack.client_for(key) for name, key in keys.items()}
    clients["operator"] = pg_stack.operator_client()
    return {"keys": keys, "clients": clients}


def _record(client: httpx.Client, secret: str) -> dict:
    """The key whose secret is ``secret``, as the caller's listing shows it."""
    found = [k for k in client.get("/v1/api-keys").json()["data"] if secret.startswith(k["prefix"])]
    assert len(found) == 1, found
    return found[0]


def _tenant_exists(pg_stack, name: str) -> bool:
    url = pg_stack.env["SQUEEZE_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT 1 FROM tenants WHERE name = %s", (name,)).fetchone() is not None


def test_a_tenant_admin_cannot_create_keys_for_another_tenant(pg_stack, tenants):
    a_admin = tenants["clients"]["a_admin"]
    for tenant in ("ten-b", "ten-new-by-admin"):  # an existing tenant and one it would create
        for scope in ("member", "admin"):
            response = a_admin.post("/v1/api-keys", json={"tenant": tenant, "name": "x", "scope": scope})
            assert response.status_code == 403, response.text
            assert response.json()["error"]["param"] == "tenant"
    # The same answer whether the tenant exists or not, and nothing created.
    assert not _tenant_exists(pg_stack, "ten-new-by-admin")
    assert all(k["name"] != "x" for k in tenants["clients"]["operator"].get("/v1/api-keys").json()["data"])


def test_no_key_obtains_the_operator_scope_through_the_api(tenants):
    for name in ("a_admin", "operator"):
        response = tenants["clients"][name].post("/v1/api-keys", json={"name": "root", "scope": "operator"})
        assert response.status_code == 422 and response.json()["error"]["param"] == "scope"
    response = tenants["clients"]["a_admin"].post("/v1/api-keys", json={"name": "x", "admin": True})
    assert response.status_code == 422 and response.json()["error"]["param"] == "admin"  # no way round it


def test_a_tenant_admin_manages_its_own_tenant(pg_stack, tenants):
    a_admin = tenants["clients"]["a_admin"]
    a_tenant = _record(a_admin, tenants["keys"]["a_admin"])["tenant_id"]
    for body in ({"name": "own-default", "scope": "admin"}, {"tenant": "ten-a", "name": "own-named"}):
        created = a_admin.post("/v1/api-keys", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["tenant_id"] == a_tenant and created.headers["cache-control"] == "no-store"
    assert created.json()["scope"] == "member" and created.json()["is_admin"] is False
    new_client = pg_stack.client_for(created.json()["key"])
    assert new_client.get("/v1/models").status_code == 200
    assert a_admin.delete(f"/v1/api-keys/{created.json()['id']}").status_code == 200
    assert new_client.get("/v1/models").status_code == 401


def test_a_tenant_admin_lists_only_its_own_tenants_keys(tenants):
    clients, keys = tenants["clients"], tenants["keys"]
    a_tenant = _record(clients["a_admin"], keys["a_admin"])["tenant_id"]
    listed = clients["a_admin"].get("/v1/api-keys").json()["data"]
    assert listed and {k["tenant_id"] for k in listed} == {a_tenant}
    b_ids = {k["id"] for k in clients["b_admin"].get("/v1/api-keys").json()["data"]}
    assert b_ids and not b_ids & {k["id"] for k in listed}
    for member in ("a_member", "b_member"):  # a member key manages no keys at all
        assert clients[member].get("/v1/api-keys").status_code == 403
        assert clients[member].post("/v1/api-keys", json={"name": "x"}).status_code == 403


def test_revoking_another_tenants_key_is_404_like_a_missing_one(tenants):
    clients, keys = tenants["clients"], tenants["keys"]
    b_member = _record(clients["b_admin"], keys["b_member"])
    response = clients["a_admin"].delete(f"/v1/api-keys/{b_member['id']}")
    missing = clients["a_admin"].delete("/v1/api-keys/key_00000000000000000000000000000000")
    assert response.status_code == missing.status_code == 404
    assert response.json()["error"]["type"] == missing.json()["error"]["type"] == "not_found"
    assert clients["b_member"].get("/v1/models").status_code == 200  # still works
    assert _record(clients["b_admin"], keys["b_member"])["revoked_at"] is None


def test_an_operator_key_is_not_managed_by_its_tenants_admin(pg_stack, tenants):
    operator_in_a = pg_stack.create_key("ten-a", scope="operator")
    record = _record(tenants["clients"]["a_admin"], operator_in_a)
    assert record["scope"] == "operator"
    response = tenants["clients"]["a_admin"].delete(f"/v1/api-keys/{record['id']}")
    assert response.status_code == 403 and response.json()["error"]["param"] == "key_id"
    assert pg_stack.client_for(operator_in_a).get("/metrics").status_code == 200


def test_the_operator_creates_tenants_and_manages_every_tenants_keys(pg_stack, tenants):
    operator, keys = tenants["clients"]["operator"], tenants["keys"]
    created = operator.post("/v1/api-keys", json={"tenant": "ten-c", "name": "first", "scope": "admin"})
    assert created.status_code == 201, created.text
    c_admin = pg_stack.client_for(created.json()["key"])
    assert [k["id"] for k in c_admin.get("/v1/api-keys").json()["data"]] == [created.json()["id"]]
    victim = pg_stack.create_key("ten-b")
    victim_id = _record(tenants["clients"]["b_admin"], victim)["id"]
    a_admin_id = _record(tenants["clients"]["a_admin"], keys["a_admin"])["id"]
    listed = {k["id"] for k in operator.get("/v1/api-keys").json()["data"]}
    assert {created.json()["id"], victim_id, a_admin_id} <= listed
    assert operator.delete(f"/v1/api-keys/{victim_id}").status_code == 200
    assert pg_stack.client_for(victim).get("/v1/models").status_code == 401


def test_a_demoted_admin_loses_key_management_at_once(pg_stack):
    secret = pg_stack.create_key("ten-d", admin=True)
    client = pg_stack.client_for(secret)
    key_id = _record(client, secret)["id"]
    pg_stack.admin_cli("set-scope", key_id, "member")
    assert client.get("/v1/api-keys").status_code == 403
    assert client.get("/v1/models").status_code == 200
