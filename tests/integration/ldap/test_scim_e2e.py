"""SCIM through a real home and a real agent on real slapd.

The HTTPS listener is another branch's (api-core); here the SCIM routes run in
this process, on home's identity.db (the same file the running home fills),
with a ``provision`` that sends each order over home's control socket, the path
of ``tether-home provision``: control socket -> Hub -> agent socket -> LDAP.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from e2erig import GROUPS_F, OPENLDAP_MAPPING, USERS_F, Rig, directory_entry, ldap_rows
from ldapfix_helpers import slapd_config
from ldapfix_slapd import SUFFIX
from tether.home import control
from tether.home.api.scim import scim_routes
from tether.home.directorystore import DirectoryStore
from tether.home.paths import StatePaths

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

USER_URN = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_URN = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH_URN = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def outcome(result) -> str:
    return next((line.split(": ", 1)[1] for line in result.stdout.splitlines()
                 if line.startswith("outcome: ")), "")


def test_scim_through_a_running_home_and_agent(seeded_ldap, test_ca, tmp_path):
    server, conn = seeded_ldap
    rig = Rig.start(tmp_path / "rig")
    store = None
    try:
        rig.agent("c-a")
        raw = slapd_config(server, test_ca, page_size=50, group_container=f"ou=groups,{SUFFIX}")
        rig.configure({"directories": [directory_entry("corp", raw)]})
        expected = lambda: ldap_rows(conn, SUFFIX, USERS_F, GROUPS_F, OPENLDAP_MAPPING)  # noqa: E731
        rig.wait_store_equals("corp", expected)
        paths = StatePaths(rig.state)
        store = DirectoryStore(paths.identity_db)
        sent: list[dict] = []

        async def provision(directory, order):
            sent.append(order)
            return await asyncio.to_thread(control.call, paths.control_socket, {
                "cmd": "provision", "directory": directory, "order": order}, 150.0)

        async def authorize(request, scope):
            return None

        app = Starlette(routes=[Mount("/scim/v2/{directory}", routes=scim_routes(
            directory_store=store, provision=provision, authorize=authorize))])

        def call(method, url, **kw):
            async def go():
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="https://home.test") as c:
                    return await c.request(method, f"/scim/v2/corp{url}", **kw)
            return asyncio.run(go())

        created = call("POST", "/Users", json={
            "schemas": [USER_URN], "userName": "scime2e", "displayName": "Scim E2E",
            "externalId": "entra-42", "emails": [{"value": "scime2e@example.com", "primary": True}],
            "password": "E2e-pass-1"})
        assert created.status_code == 201, created.text
        user = created.json()
        assert sent[0]["op"] == "create_user" and sent[0]["read_back"] is True
        ok = rig.authenticate("corp", "scime2e", "E2e-pass-1")
        assert outcome(ok) == "success", ok.stdout + ok.stderr
        found = call("GET", "/Users", params={"filter": 'externalId eq "entra-42"'}).json()
        assert [r["id"] for r in found["Resources"]] == [user["id"]]

        off = call("PATCH", f"/Users/{user['id']}", json={
            "schemas": [PATCH_URN], "Operations": [{"op": "replace", "value": {"active": False}}]})
        assert off.status_code == 200 and off.json()["active"] is False, off.text
        assert outcome(rig.authenticate("corp", "scime2e", "E2e-pass-1")) == "disabled"

        u001 = call("GET", "/Users", params={"filter": 'userName eq "u001"'}).json()["Resources"][0]
        made = call("POST", "/Groups", json={"schemas": [GROUP_URN], "displayName": "scim-e2e",
                                             "members": [{"value": u001["id"]}]})
        assert made.status_code == 201, made.text
        group = made.json()
        assert [m["value"] for m in group["members"]] == [u001["id"]]
        added = call("PATCH", f"/Groups/{group['id']}", json={"schemas": [PATCH_URN], "Operations": [
            {"op": "add", "path": "members", "value": [{"value": user["id"]}]}]})
        assert sorted(m["value"] for m in added.json()["members"]) == sorted([u001["id"], user["id"]])

        assert call("DELETE", f"/Groups/{group['id']}").status_code == 204
        assert call("DELETE", f"/Users/{user['id']}").status_code == 204
        assert outcome(rig.authenticate("corp", "scime2e", "E2e-pass-1")) == "unknown_user"
        # the change feed and SCIM's read-back agree: the store equals the directory
        rig.wait_store_equals("corp", expected)
        assert store.entry("corp", user["id"]) is None and store.entry("corp", group["id"]) is None

        # home stopped: the order's outcome is unknown to SCIM only if it was sent; here
        # nothing answers, so the client gets a 503 to retry, never a success
        rig.home.stop()
        down = call("POST", "/Users", json={"schemas": [USER_URN], "userName": "scimdown"})
        assert down.status_code == 503 and down.headers["retry-after"], down.text
        assert store.find_by_field("corp", "user", "username", "scimdown") == []
    finally:
        if store is not None:
            store.close()
        rig.stop()
