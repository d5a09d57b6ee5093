"""SCIM writes against real directories: home's SCIM app, a real identity store filled by a
real sync, and orders carried out by the agent's directory engine on real slapd / Samba AD.

``provision`` here answers what home's control socket answers (``{"ok", "result": {"ok",
"result", "instance"}}``, home/server.py) with the agent's engine doing the work, so the
path from SCIM to the directory is the product's except for the websocket hop, which
tests/integration/test_home_directory.py covers.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from ldapfix_helpers import AD_BASE, ad_user, slapd_config
from ldapfix_slapd import SUFFIX
from tether.agent.directory import DirectoryService
from tether.home.api.scim import scim_routes
from tether.home.directorystore import DirectoryStore

USER_URN = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_URN = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH_URN = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"


class Home:
    """A directory's identity store, synced for real, behind the SCIM app."""

    def __init__(self, raw: dict, tmp_path, directory: str = "corp"):
        self.svc = DirectoryService(raw)
        self.store = DirectoryStore(tmp_path / "identity.db")
        self.directory, self.seq, self.cursor = directory, 0, None
        self.sync()

        async def provision(directory, order):
            result = await asyncio.to_thread(self.svc.provision, order)
            return {"ok": True, "result": {"ok": result.get("status") == "done", "result": result,
                                           "instance": "local"}}

        async def authorize(request, scope):
            return None

        self.app = Starlette(routes=[Mount("/scim/v2/{directory}", routes=scim_routes(
            directory_store=self.store, provision=provision, authorize=authorize))])

    def sync(self) -> None:
        """One sync stream (full first, then incremental) applied as home applies it."""
        entries = []
        for message in self.svc.sync(self.cursor):
            self.seq += 1
            entries.append({"seq": self.seq, "message": message})
        result = self.store.apply_batch(self.directory, "inst-1", entries)
        self.cursor = result.cursor or self.cursor

    def call(self, *calls):
        async def go():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="https://home.test") as c:
                return [await c.request(method, f"/scim/v2/{self.directory}{url}", **kw)
                        for method, url, kw in calls]
        return asyncio.run(go())

    def one(self, method, url, **kw):
        return self.call((method, url, kw))[0]

    def close(self):
        self.store.close()
        self.svc.close()


def _patch(*ops) -> dict:
    return {"json": {"schemas": [PATCH_URN], "Operations": list(ops)}}


def test_openldap_users_and_groups_through_scim(seeded_ldap, test_ca, tmp_path):
    server, admin = seeded_ldap
    raw = slapd_config(server, test_ca, group_container=f"ou=groups,{SUFFIX}")
    home = Home(raw, tmp_path)
    try:
        # create as Okta sends it: the answer carries the directory's id and state
        created = home.one("POST", "/Users", json={
            "schemas": [USER_URN, ENTERPRISE], "userName": "scim1", "externalId": "okta-1",
            "name": {"givenName": "Scim", "familyName": "One"}, "displayName": "Scim One",
            "emails": [{"value": "scim1@example.com", "primary": True, "type": "work"}],
            "password": "Scim-pass-1", "active": True, ENTERPRISE: {"department": "R&D"}})
        assert created.status_code == 201, created.text
        user = created.json()
        admin.search(f"uid=scim1,ou=people,{SUFFIX}", "(objectClass=*)", attributes=["entryUUID", "cn", "mail"])
        assert user["id"] == admin.entries[0].entryUUID.value
        assert admin.entries[0].cn.value == "Scim One" and admin.entries[0].mail.value == "scim1@example.com"
        assert user["userName"] == "scim1" and user["externalId"] == "okta-1" and user["active"] is True
        assert "password" not in user and created.headers["location"].endswith(f"/Users/{user['id']}")
        assert home.svc.authenticate("scim1", "Scim-pass-1")["outcome"] == "success"
        # a GET right after the POST sees it, by id and by the filters IdPs send
        assert home.one("GET", f"/Users/{user['id']}").json()["userName"] == "scim1"
        for flt in ('userName eq "scim1"', 'externalId eq "okta-1"'):
            found = home.one("GET", "/Users", params={"filter": flt}).json()
            assert [r["id"] for r in found["Resources"]] == [user["id"]]
        # a repeated create (a retry after an unknown outcome) creates nothing
        again = home.one("POST", "/Users", json={"schemas": [USER_URN], "userName": "scim1"})
        assert again.status_code == 409 and again.json()["scimType"] == "uniqueness"

        # PATCH active=false, as Okta and Entra ID deprovision
        off = home.one("PATCH", f"/Users/{user['id']}",
                       **_patch({"op": "replace", "value": {"active": False}}))
        assert off.status_code == 200, off.text
        assert off.json()["active"] is False
        assert home.svc.authenticate("scim1", "Scim-pass-1")["outcome"] == "disabled"
        home.sync()  # the change feed carries the lock: still inactive afterwards
        assert home.one("GET", f"/Users/{user['id']}").json()["active"] is False
        on = home.one("PATCH", f"/Users/{user['id']}", **_patch({"op": "replace", "path": "active", "value": True}))
        assert on.json()["active"] is True
        assert home.svc.authenticate("scim1", "Scim-pass-1")["outcome"] == "success"
        # attribute changes and a password change
        mail = home.one("PATCH", f"/Users/{user['id']}", **_patch(
            {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "s1@example.com"},
            {"op": "replace", "path": "password", "value": "Scim-pass-2"}))
        assert mail.status_code == 200, mail.text
        assert mail.json()["emails"][0]["value"] == "s1@example.com"
        assert home.svc.authenticate("scim1", "Scim-pass-2")["outcome"] == "success"
        renamed = home.one("PATCH", f"/Users/{user['id']}", **_patch(
            {"op": "replace", "path": "name.formatted", "value": "Scim Uno"}))
        assert renamed.json()["displayName"] == "Scim Uno", renamed.text
        admin.search(f"uid=scim1,ou=people,{SUFFIX}", "(objectClass=*)", attributes=["cn"])
        assert admin.entries[0].cn.value == "Scim Uno"
        put = home.one("PUT", f"/Users/{user['id']}", json={
            "schemas": [USER_URN], "userName": "scim1", "externalId": "okta-1", "displayName": "Scim Put",
            "emails": [{"value": "put@example.com", "primary": True}]})
        assert put.status_code == 200, put.text
        assert (put.json()["displayName"], put.json()["emails"][0]["value"], put.json()["active"]) == (
            "Scim Put", "put@example.com", True)
        assert home.svc.authenticate("scim1", "Scim-pass-2")["outcome"] == "success"

        # groups: create with a member, add and remove members, delete
        u003 = home.one("GET", "/Users", params={"filter": 'userName eq "u003"'}).json()["Resources"][0]
        made = home.one("POST", "/Groups", json={"schemas": [GROUP_URN], "displayName": "scim-team",
                                                 "members": [{"value": user["id"]}]})
        assert made.status_code == 201, made.text
        group = made.json()
        assert [m["value"] for m in group["members"]] == [user["id"]]
        names = [g["name"] for g in home.svc.authenticate("scim1", "Scim-pass-2")["groups"]]
        assert "scim-team" in names
        changed = home.one("PATCH", f"/Groups/{group['id']}", **_patch(
            {"op": "add", "path": "members", "value": [{"value": u003["id"]}]},
            {"op": "remove", "path": f'members[value eq "{user["id"]}"]'}))
        assert changed.status_code == 200, changed.text
        assert [m["value"] for m in changed.json()["members"]] == [u003["id"]]
        assert "scim-team" not in [g["name"] for g in home.svc.authenticate("scim1", "Scim-pass-2")["groups"]]
        assert "scim-team" in [g["name"] for g in home.svc.authenticate("u003", "pw003")["groups"]]

        # the change feed brings the same states: nothing moves, nothing doubles
        home.sync()
        assert home.one("GET", f"/Groups/{group['id']}").json()["members"][0]["value"] == u003["id"]
        assert home.one("GET", f"/Users/{user['id']}").json()["emails"][0]["value"] == "put@example.com"
        assert home.one("GET", "/Users", params={"filter": 'userName eq "scim1"'}).json()["totalResults"] == 1

        assert home.one("DELETE", f"/Groups/{group['id']}").status_code == 204
        assert home.one("GET", f"/Groups/{group['id']}").status_code == 404
        assert admin.search(f"ou=groups,{SUFFIX}", "(cn=scim-team)") is False or not admin.entries
        assert home.one("DELETE", f"/Users/{user['id']}").status_code == 204
        assert home.svc.authenticate("scim1", "Scim-pass-2")["outcome"] == "unknown_user"
        assert home.one("GET", "/Users", params={"filter": 'externalId eq "okta-1"'}).json()["totalResults"] == 0
        assert home.one("DELETE", f"/Users/{user['id']}").status_code == 404  # a retried delete
    finally:
        home.close()


@pytest.mark.slow
def test_ad_create_disable_and_membership_through_scim(samba, ad_raw, ad_admin, tmp_path):
    name = f"sc{uuid.uuid4().hex[:6]}"
    member = ad_user(ad_admin, f"{name}m", "Member-Pass-1")
    home = Home(ad_raw, tmp_path)
    try:
        created = home.one("POST", "/Users", json={
            "schemas": [USER_URN], "userName": name, "displayName": f"Scim {name}",
            "emails": [{"value": f"{name}@example.com", "primary": True}], "password": "Scim-Pass-1!"})
        assert created.status_code == 201, created.text
        user = created.json()
        assert user["active"] is True and user["userName"] == name
        assert home.svc.authenticate(name, "Scim-Pass-1!")["outcome"] == "success"
        # PATCH active=false disables the account in AD (Entra ID sends the string "False")
        off = home.one("PATCH", f"/Users/{user['id']}",
                       **_patch({"op": "Replace", "path": "active", "value": "False"}))
        assert off.status_code == 200, off.text
        assert off.json()["active"] is False
        ad_admin.search(f"CN=Scim {name},CN=Users,{AD_BASE}", "(objectClass=user)",
                        attributes=["userAccountControl"])
        assert int(ad_admin.entries[0].userAccountControl.value) & 0x2
        assert home.svc.authenticate(name, "Scim-Pass-1!")["outcome"] == "disabled"
        assert home.one("GET", f"/Users/{user['id']}").json()["active"] is False

        made = home.one("POST", "/Groups", json={"schemas": [GROUP_URN], "displayName": f"{name}-g"})
        assert made.status_code == 201, made.text
        group = made.json()
        assert "members" not in group
        home.sync()  # the member was created outside SCIM: the sync brings it
        member_id = home.one("GET", "/Users", params={"filter": f'userName eq "{name}m"'}).json()["Resources"][0]["id"]
        added = home.one("PATCH", f"/Groups/{group['id']}", **_patch(
            {"op": "add", "path": "members", "value": [{"value": member_id}, {"value": user["id"]}]}))
        assert added.status_code == 200, added.text
        assert sorted(m["value"] for m in added.json()["members"]) == sorted([member_id, user["id"]])
        assert f"{name}-g" in [g["name"] for g in home.svc.authenticate(f"{name}m", "Member-Pass-1")["groups"]]
        removed = home.one("PATCH", f"/Groups/{group['id']}", **_patch(
            {"op": "remove", "path": f'members[value eq "{member_id}"]'}))
        assert [m["value"] for m in removed.json()["members"]] == [user["id"]]
        assert home.one("DELETE", f"/Groups/{group['id']}").status_code == 204
        assert home.one("DELETE", f"/Users/{user['id']}").status_code == 204
        assert home.svc.authenticate(name, "Scim-Pass-1!")["outcome"] == "unknown_user"
        assert member == f"CN={name}m,CN=Users,{AD_BASE}"
    finally:
        home.close()
