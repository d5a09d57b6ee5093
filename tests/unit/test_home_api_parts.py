"""The HTTPS API's parts without a server: the store, tokens, the SCIM mount, packaging."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount

from tether.home.api.app import Api, Backend
from tether.home.api.tokens import Tokens, load_signing_key
from tether.home.apistore import ApiStore, ApiStoreError
from tether.home.directorystore import DirectoryStore
from tether.image import wheelhouse

CHECKOUT = Path(__file__).resolve().parents[2]


def test_appliance_wheelhouse_leaves_out_the_home_extra():
    """The image installs the tether-agent wheel with its [project] dependencies only."""
    data = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())
    runtime = " ".join(wheelhouse.runtime_requirements(CHECKOUT / "pyproject.toml")).lower()
    home = data["project"]["optional-dependencies"]["home"]
    assert {"starlette", "uvicorn", "authlib", "prometheus-client"} <= {
        r.split(">")[0].split("=")[0].strip().lower() for r in home}
    for name in ("starlette", "uvicorn", "authlib", "prometheus"):
        assert name not in runtime
    install = (CHECKOUT / "ansible/roles/agent/files/install_agent.py").read_text()
    assert '"tether-agent==" + args["version"]' in install  # no [home] extra on the appliance


def test_store_keeps_hashes_and_revokes(tmp_path):
    store = ApiStore(tmp_path / "api.sqlite3")
    secret = store.create_client("okta", ["authenticate"])
    token_id, token = store.create_token("okta")
    raw = (tmp_path / "api.sqlite3").read_bytes()
    assert secret.encode() not in raw and token.split(".")[1].encode() not in raw
    assert store.verify_client("okta", secret) and not store.verify_client("okta", secret + "x")
    assert store.verify_token(token)["token_id"] == token_id
    assert store.verify_token(token[:-1] + ("B" if token.endswith("A") else "A")) is None
    with pytest.raises(ApiStoreError, match="exists already"):
        store.create_client("okta", ["authenticate"])
    with pytest.raises(ApiStoreError, match="scope"):
        store.create_client("other", ["root"])
    assert store.revoke_client("okta") == 1
    assert store.verify_token(token) is None and store.verify_client("okta", secret) is None


def _api(tmp_path) -> tuple[Api, str]:
    store = ApiStore(tmp_path / "api.sqlite3")
    store.create_client("scim", ["directory:read"])
    _, token = store.create_token("scim")
    directory_store = DirectoryStore(tmp_path / "identity.db")
    directory_store.apply_batch("corp", "inst-1", [
        {"seq": 1, "message": {"type": "begin", "mode": "full"}},
        {"seq": 2, "message": {"type": "chunk", "changes": [
            {"op": "upsert", "kind": "user", "id": "u1", "dn": "uid=ann,ou=people,dc=corp",
             "attributes": {"username": "ann"}}]}},
        {"seq": 3, "message": {"type": "end", "cursor": "c1"}}])

    async def nothing(*args):
        return {"ok": False, "code": "unavailable", "error": "no agent"}
    backend = Backend(authenticate=nothing, provision=nothing,
                      status=lambda: {"connectors": [], "directories": []},
                      ready=lambda: (True, "test"), directory_store=directory_store)
    tokens = Tokens(store, load_signing_key(tmp_path / "k.pem"), "https://testserver")
    return Api(backend, store, tokens), token


def test_scim_is_mounted_with_home_authorize(tmp_path):
    """SCIM lives under /scim/v2/{directory}, behind home's token check."""
    api, token = _api(tmp_path)
    assert isinstance(api.scim_mount()[0], Mount)
    bearer = {"Authorization": f"Bearer {token}"}

    async def go():  # in this thread: the identity store is used by home's loop only
        transport = httpx.ASGITransport(app=api.app())
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            return (await c.get("/scim/v2/corp/Users", headers=bearer),
                    await c.get("/scim/v2/corp/Users"),
                    await c.get("/scim/v2/other/Users", headers=bearer))
    ok, refused, unknown = asyncio.run(go())
    assert ok.status_code == 200
    assert [r["userName"] for r in ok.json()["Resources"]] == ["ann"]
    assert refused.status_code == 401
    assert refused.json()["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert unknown.status_code == 404


def _guard_call(tmp_path, messages, path="/v1/x", headers=(), body_seconds=10.0):
    """Drive Guard with raw ASGI messages; returns (status, content-type, JSON body, app ran)."""
    from starlette.responses import JSONResponse as Json

    from tether.home.api import metrics as api_metrics
    from tether.home.api.app import Guard

    ran = []

    async def app(scope, receive, send):
        from starlette.requests import Request
        ran.append(await Request(scope, receive).body())
        await Json({"ok": True})(scope, receive, send)

    store = ApiStore(tmp_path / "api.sqlite3")
    guard = Guard(app, store, api_metrics.Metrics(lambda: {}), max_body=100,
                  body_seconds=body_seconds)
    out = []
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)  # a client that sends nothing more

    async def send(message):
        out.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers),
             "client": ("127.0.0.1", 1), "query_string": b""}
    asyncio.run(guard(scope, receive, send))
    start = out[0]
    body = b"".join(m.get("body", b"") for m in out[1:])
    content_type = dict(start["headers"]).get(b"content-type", b"").decode()
    rows = store.audit_rows()
    store.close()
    return start["status"], content_type, json.loads(body), ran, rows


def test_guard_answers_413_and_408_itself_never_500(tmp_path):
    """A chunked body that outgrows the bound, or one that stops half way, is answered
    413 / 408 by Guard in the path's error format; the app never sees it."""
    chunks = [{"type": "http.request", "body": b"x" * 60, "more_body": True},
              {"type": "http.request", "body": b"x" * 60, "more_body": False}]
    status, ctype, doc, ran, rows = _guard_call(tmp_path, chunks)
    assert (status, ctype, doc["error"], ran) == (413, "application/json", "invalid_request", [])
    assert rows[-1]["outcome"] == "too_large"
    status, ctype, doc, ran, _ = _guard_call(tmp_path, chunks, path="/scim/v2/corp/Users")
    assert status == 200 and ran == [b"x" * 120]  # SCIM's own bound (1 MiB) is larger
    status, ctype, doc, ran, _ = _guard_call(
        tmp_path, [{"type": "http.request", "body": b"x" * 10, "more_body": True}],
        path="/scim/v2/corp/Users", body_seconds=0.05)
    assert (status, ctype, ran) == (408, "application/scim+json", [])
    assert doc["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"] and doc["status"] == "408"
    status, _, doc, ran, _ = _guard_call(tmp_path, [{"type": "http.request", "body": b"{}"}])
    assert status == 200 and ran == [b"{}"]
