"""Home's SCIM service (home/api/scim.py) over a real identity store file, in process.

Why httpx's ASGI transport rather than Starlette's TestClient: TestClient runs
the app on a thread of its own, and a sqlite3 connection belongs to the thread
that opened it; home runs the app on its own event loop thread, as here.
Writes against real directories are in tests/integration/ldap/test_scim_directory.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount

from tether.home.api.scim import MAX_BODY, ScimError, _outcome, scim_routes
from tether.home.directorystore import DirectoryStore

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
USER_URN = "urn:ietf:params:scim:schemas:core:2.0:User"


def seed(store: DirectoryStore, n: int = 30) -> None:
    """A full sync, through the store's own API, as the agent streams it."""
    users = [{"op": "upsert", "kind": "user", "id": f"id-{i:03d}", "dn": f"uid=u{i:03d},ou=people,dc=x",
              "attributes": {"username": f"u{i:03d}", "name": f"User {i}",
                             "email": f"u{i}@example.com", "department": "ops" if i % 2 else "dev"},
              "disabled": i == 7} for i in range(n)]
    users.append({"op": "upsert", "kind": "user", "id": "id-bad", "dn": "uid=weird,dc=x",
                  "attributes": {"username": "weird", "email": "not an address"}})
    groups = [{"op": "upsert", "kind": "group", "id": "g-staff", "dn": "cn=staff,ou=groups,dc=x",
               "attributes": {"name": "staff"},
               "members": ["UID=u001,ou=people,dc=x", "uid=u002,ou=people,dc=x", "uid=gone,dc=x",
                           "cn=admins,ou=groups,dc=x"]},
              {"op": "upsert", "kind": "group", "id": "g-admins", "dn": "cn=admins,ou=groups,dc=x",
               "attributes": {"name": "admins"}, "members": []}]
    store.apply_batch("corp", "inst-1", [
        {"seq": 1, "message": {"type": "begin", "mode": "full"}},
        {"seq": 2, "message": {"type": "chunk", "changes": users + groups}},
        {"seq": 3, "message": {"type": "end", "cursor": "c1"}}])
    store.set_external_id("corp", "id-004", "okta-00u4")


class Rig:
    """The SCIM app, the store behind it, and what reached ``provision``."""

    def __init__(self, tmp_path, scopes=("directory:read", "directory:write")):
        self.store = DirectoryStore(tmp_path / "identity.db")
        seed(self.store)
        self.orders: list = []
        self.scopes = set(scopes)

        async def authorize(request, scope):
            if request.headers.get("authorization") != "Bearer test-token":
                return JSONResponse({"error": "invalid_token"}, status_code=401)
            return None if scope in self.scopes else JSONResponse(
                {"error": "insufficient_scope"}, status_code=403)

        async def provision(directory, order):
            self.orders.append(order)  # these tests only send input that must be refused
            raise AssertionError(f"no order may be sent here: {order}")

        self.app = Starlette(routes=[Mount("/scim/v2/{directory}", routes=scim_routes(
            directory_store=self.store, provision=provision, authorize=authorize))])

    def run(self, *calls):
        async def go():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="https://home.test",
                                         headers={"authorization": "Bearer test-token"}) as c:
                return [await c.request(method, f"/scim/v2/corp{url}", **kw)
                        for method, url, kw in calls]
        return asyncio.run(go())

    def get(self, url, **kw):
        return self.run(("GET", url, kw))[0]


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.store.close()


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [r["id"] for r in response.json()["Resources"]]


def test_discovery(rig):
    spc = rig.get("/ServiceProviderConfig")
    assert spc.status_code == 200 and spc.headers["content-type"].startswith("application/scim+json")
    body = spc.json()
    assert body["patch"]["supported"] and body["filter"] == {"supported": True, "maxResults": 200}
    assert body["bulk"]["supported"] is False and body["authenticationSchemes"][0]["type"] == "oauthbearertoken"
    types = rig.get("/ResourceTypes").json()
    assert {t["id"]: t["endpoint"] for t in types["Resources"]} == {"User": "/Users", "Group": "/Groups"}
    user_type = rig.get("/ResourceTypes/User").json()
    assert user_type["schemaExtensions"] == [{"schema": ENTERPRISE, "required": False}]
    schemas = rig.get("/Schemas").json()
    assert {s["id"] for s in schemas["Resources"]} == {
        USER_URN, ENTERPRISE, "urn:ietf:params:scim:schemas:core:2.0:Group"}
    user_schema = rig.get(f"/Schemas/{USER_URN}").json()
    assert "userName" in {a["name"] for a in user_schema["attributes"]}
    assert rig.get("/Schemas/urn:nope").status_code == 404


def test_filters_as_identity_providers_send_them(rig):
    # Okta and Entra ID look users up by userName / externalId (case-insensitive userName)
    assert ids(rig.get("/Users", params={"filter": 'userName eq "U003"'})) == ["id-003"]
    assert ids(rig.get("/Users", params={"filter": 'externalId eq "okta-00u4"'})) == ["id-004"]
    assert ids(rig.get("/Users", params={"filter": 'externalId eq "OKTA-00U4"'})) == []  # caseExact
    assert ids(rig.get("/Users", params={"filter": 'userName eq "nobody"'})) == []
    assert ids(rig.get("/Users", params={"filter": 'id eq "id-010"'})) == ["id-010"]
    r = rig.get("/Users", params={"filter": 'userName eq "u005" and active eq true'})
    assert ids(r) == ["id-005"] and r.json()["totalResults"] == 1
    assert ids(rig.get("/Users", params={"filter": 'userName eq "u007" and active eq true'})) == []
    # co / sw / pr / or / not / sub-attributes / the enterprise extension
    assert ids(rig.get("/Users", params={"filter": 'userName sw "u02"'})) == [
        f"id-{i:03d}" for i in range(20, 30)]
    assert ids(rig.get("/Users", params={"filter": 'emails.value co "u29@"'})) == ["id-029"]
    assert ids(rig.get("/Users", params={"filter": 'emails co "U28@EXAMPLE"'})) == ["id-028"]
    assert ids(rig.get("/Users", params={"filter": 'emails[type eq "work" and value sw "u27@"]'})) == ["id-027"]
    assert ids(rig.get("/Users", params={"filter": 'active eq false'})) == ["id-007"]
    r = rig.get("/Users", params={"filter": f'{ENTERPRISE}:department eq "ops" and userName sw "u00"'})
    assert ids(r) == ["id-001", "id-003", "id-005", "id-007", "id-009"]
    r = rig.get("/Users", params={"filter": 'not (emails pr) or userName eq "u000"'})
    assert ids(r) == ["id-000"]  # filters see the directory's value, even one not shown
    assert rig.get("/Users", params={"filter": "externalId pr"}).json()["totalResults"] == 1
    # groups by displayName, as both send before creating one
    assert ids(rig.get("/Groups", params={"filter": 'displayName eq "STAFF"'})) == ["g-staff"]


def test_paging_and_attributes(rig):
    r = rig.get("/Users", params={"startIndex": 3, "count": 2})
    body = r.json()
    assert body["totalResults"] == 31 and body["startIndex"] == 3 and body["itemsPerPage"] == 2
    assert ids(r) == ["id-002", "id-003"]
    assert rig.get("/Users", params={"count": 0}).json()["Resources"] == []
    assert len(rig.get("/Users", params={"count": 100000}).json()["Resources"]) == 31  # capped at 200
    r = rig.get("/Users", params={"filter": 'userName sw "u01"', "startIndex": 9, "count": 5})
    assert r.json()["totalResults"] == 10 and ids(r) == ["id-018", "id-019"]
    only = rig.get("/Users", params={"attributes": "userName", "filter": 'userName eq "u001"'})
    assert only.json()["Resources"] == [{"schemas": [USER_URN], "id": "id-001",
                                         "userName": "u001"}]
    less = rig.get("/Users/id-001", params={"excludedAttributes": "emails,name"}).json()
    assert "emails" not in less and "name" not in less and less["userName"] == "u001"
    user = rig.get("/Users/id-001").json()
    assert user["emails"] == [{"value": "u1@example.com", "type": "work", "primary": True}]
    assert user[ENTERPRISE] == {"department": "ops"} and user["active"] is True
    assert user["meta"]["location"] == "https://home.test/scim/v2/corp/Users/id-001"
    assert rig.get("/Users/id-007").json()["active"] is False
    assert rig.get("/Users/id-004").json()["externalId"] == "okta-00u4"
    weird = rig.get("/Users/id-bad").json()  # a directory value SCIM refuses is left out
    assert weird["userName"] == "weird" and "emails" not in weird


def test_groups_members_are_entry_ids(rig):
    staff = rig.get("/Groups/g-staff").json()
    assert staff["displayName"] == "staff"
    # member DNs match entries by meaning ("UID=u001" is u001); an unsynced DN is left out
    assert sorted((m["value"], m["type"]) for m in staff["members"]) == [
        ("g-admins", "Group"), ("id-001", "User"), ("id-002", "User")]
    refs = {m["value"]: m["$ref"] for m in staff["members"]}
    assert refs["id-001"].endswith("/scim/v2/corp/Users/id-001")
    assert refs["g-admins"].endswith("/scim/v2/corp/Groups/g-admins")
    r = rig.get("/Groups", params={"excludedAttributes": "members"})
    assert all("members" not in g for g in r.json()["Resources"])
    assert rig.get("/Groups/id-001").status_code == 404  # a user's id is no group
    assert rig.get("/Users/g-staff").status_code == 404


def scim_error(response, status, scim_type=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert body["status"] == str(status) and body.get("scimType") == scim_type
    assert "Traceback" not in body["detail"]
    return body["detail"]


def test_bad_input_gets_scim_errors_and_writes_nothing(rig):
    before = rig.store.counts("corp")
    headers = {"content-type": "application/scim+json"}
    assert "invalid syntax" in scim_error(rig.get("/Users", params={"filter": 'userName eq'}),
                                          400, "invalidFilter")
    assert "shoe" in scim_error(rig.get("/Users", params={"filter": 'shoe eq "x"'}), 400, "invalidFilter")
    scim_error(rig.get("/Users", params={"filter": "x" * 5000}), 400, "invalidFilter")
    scim_error(rig.get("/Users", params={"sortBy": "userName"}), 400, "invalidValue")
    calls = [
        ("POST", "/Users", {"content": b"{not json", "headers": headers}),
        ("POST", "/Users", {"content": b"[1, 2]", "headers": headers}),
        ("POST", "/Users", {"json": {"schemas": [USER_URN], "userName": "new1", "shoeSize": 43}}),
        ("POST", "/Users", {"json": {"schemas": [USER_URN]}}),
        ("POST", "/Users", {"json": {"schemas": [USER_URN], "userName": "U001"}}),
        ("POST", "/Users", {"content": b"x" * (MAX_BODY + 1), "headers": headers}),
        ("PATCH", "/Users/id-001", {"json": {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                                             "Operations": [{"op": "frob", "path": "active"}]}}),
        ("PATCH", "/Users/id-001", {"json": {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                                             "Operations": [{"op": "replace", "path": "userName",
                                                             "value": "renamed"}]}}),
        ("PATCH", "/Groups/g-staff", {"json": {
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "add", "path": "members", "value": [{"value": "no-such-id"}]}]}}),
        ("POST", "/Groups", {"json": {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                                      "displayName": "Staff"}}),
        ("DELETE", "/Users/no-such-id", {}),
        ("PUT", "/Groups/no-such-id", {"json": {}}),
        ("PATCH", "/Groups/g-staff", {"json": {
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "add", "path": "members",
                            "value": [{"value": f"m{i}"} for i in range(1001)]}]}}),
        ("POST", "/Users", {"content": b"{}", "headers": {**headers, "content-length": "x"}}),
    ]
    got = rig.run(*calls)
    assert "not JSON" in scim_error(got[0], 400, "invalidSyntax")
    scim_error(got[1], 400, "invalidSyntax")
    assert "shoeSize" in scim_error(got[2], 400, "invalidSyntax")
    assert "userName" in scim_error(got[3], 400, "invalidValue")
    scim_error(got[4], 409, "uniqueness")
    scim_error(got[5], 413)
    scim_error(got[6], 400, "invalidValue")
    scim_error(got[7], 400, "mutability")
    assert "no-such-id" in scim_error(got[8], 400, "invalidValue")
    scim_error(got[9], 409, "uniqueness")
    scim_error(got[10], 404)
    scim_error(got[11], 404)
    assert "at most 1000" in scim_error(got[12], 400, "invalidValue")
    assert "Content-Length" in scim_error(got[13], 400, "invalidSyntax")
    assert rig.orders == [] and rig.store.counts("corp") == before
    # unknown directory, unknown resource
    assert "no directory 'other'" in scim_error(asyncio.run(_get_other(rig)), 404)


async def _get_other(rig):
    transport = httpx.ASGITransport(app=rig.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://home.test",
                                 headers={"authorization": "Bearer test-token"}) as c:
        return await c.get("/scim/v2/other/Users")


def test_authorize_decides_by_scope(tmp_path):
    rig = Rig(tmp_path, scopes=("directory:read",))
    try:
        assert rig.get("/Users/id-001").status_code == 200
        denied = rig.run(("POST", "/Users", {"json": {"schemas": [USER_URN], "userName": "x"}}),
                         ("DELETE", "/Users/id-001", {}),
                         ("GET", "/Users", {"headers": {"authorization": "Bearer forged"}}))
        assert [r.status_code for r in denied] == [403, 403, 401]
        assert denied[0].json() == {"error": "insufficient_scope"}  # the authorizer's answer, as is
        assert rig.orders == [] and rig.store.entry("corp", "id-001") is not None
    finally:
        rig.store.close()


def test_outcome_of_a_provisioning_answer():
    """How the control socket's ``provision`` answer maps onto SCIM (home/server.py shapes)."""
    order = {"id": "o1", "op": "create_user"}
    done = {"id": "o1", "op": "create_user", "status": "done", "dn": "uid=a,dc=x"}
    assert _outcome({"ok": True, "result": {"ok": True, "result": done, "instance": "i"}}, order) == done

    def status(reply):
        with pytest.raises(ScimError) as err:
            _outcome(reply, order)
        return err.value.status, err.value.scim_type, err.value.headers.get("Retry-After")

    unknown = {"ok": False, "result": {"status": "failed", "code": "outcome_unknown",
                                       "outcome_unknown": True, "reason": "socket closed"}}
    assert status({"ok": True, "result": unknown}) == (503, None, "5")  # never a success
    assert status({"ok": True, "result": {"ok": False, "result": {
        "status": "failed", "code": "server_down", "outcome_unknown": True}}})[0] == 503
    assert status({"ok": False, "code": "unavailable", "error": "no connector"}) == (503, None, "5")
    assert status(None)[0] == 503
    assert status({"ok": False, "code": "not_found", "error": "no directory"})[0] == 404

    def failed(**res):
        return {"ok": True, "result": {"ok": False, "result": {"status": "failed", **res}}}
    assert status(failed(server_code=68, reason="entryAlreadyExists")) == (409, "uniqueness", None)
    assert status(failed(server_code=19, reason="password too short")) == (400, "invalidValue", None)
    assert status(failed(code="bad_order", reason="create_user needs 'username'")) == (
        400, "invalidValue", None)
    assert status(failed(server_code=50, reason="insufficientAccessRights"))[0] == 502
    assert status({"ok": True, "result": {"ok": True, "result": {"status": "weird"}}})[0] == 503


def test_patch_sends_what_it_names_even_when_homes_copy_agrees(tmp_path):
    """Home's copy may trail the directory by one change (a sync record read before an
    earlier order landed): a PATCH that names a member or ``active`` must still send its
    order, never answer 200 having sent nothing."""
    rig = Rig(tmp_path)
    sent = []

    async def provision(directory, order):
        sent.append(order)
        return {"ok": True, "result": {"result": {"status": "done"}}}
    rig.app = Starlette(routes=[Mount("/scim/v2/{directory}", routes=scim_routes(
        directory_store=rig.store, provision=provision,
        authorize=lambda request, scope: _allowed()))])
    patch = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
    # home's copy: id-003 is not in staff (the directory may say otherwise)
    okta_remove = {"schemas": [patch], "Operations": [
        {"op": "remove", "path": 'members[value eq "id-003"]'}]}
    entra_remove = {"schemas": [patch], "Operations": [
        {"op": "Remove", "path": "members", "value": [{"value": "id-003"}]}]}
    # home's copy: id-001 already in staff, id-007 already disabled
    add_again = {"schemas": [patch], "Operations": [
        {"op": "add", "path": "members", "value": [{"value": "id-001"}]}]}
    disable_again = {"schemas": [patch], "Operations": [
        {"op": "replace", "value": {"active": False}}]}
    answers = rig.run(("PATCH", "/Groups/g-staff", {"json": okta_remove}),
                      ("PATCH", "/Groups/g-staff", {"json": entra_remove}),
                      ("PATCH", "/Groups/g-staff", {"json": add_again}),
                      ("PATCH", "/Users/id-007", {"json": disable_again}))
    assert [a.status_code for a in answers] == [200, 200, 200, 200], [a.text for a in answers]
    assert [(o["op"], o.get("member_dn") or o.get("dn")) for o in sent] == [
        ("remove_member", "uid=u003,ou=people,dc=x"),
        ("remove_member", "uid=u003,ou=people,dc=x"),
        ("add_member", "uid=u001,ou=people,dc=x"),
        ("disable_user", "uid=u007,ou=people,dc=x")]
    rig.store.close()


async def _allowed():
    return None
