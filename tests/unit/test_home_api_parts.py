"""The HTTPS API's parts without a server: the store, tokens, the SCIM mount, packaging."""

from __future__ import annotations

import sys
import tomllib
import types
from pathlib import Path

import pytest
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from tether.home.api.app import Api, Backend
from tether.home.api.tokens import Tokens, load_signing_key
from tether.home.apistore import ApiStore, ApiStoreError
from tether.image import wheelhouse

CHECKOUT = Path(__file__).resolve().parents[2]


def test_appliance_wheelhouse_leaves_out_the_home_extra():
    """The image installs the tether wheel with its [project] dependencies only."""
    data = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())
    runtime = " ".join(wheelhouse.runtime_requirements(CHECKOUT / "pyproject.toml")).lower()
    home = data["project"]["optional-dependencies"]["home"]
    assert {"starlette", "uvicorn", "authlib", "prometheus-client"} <= {
        r.split(">")[0].split("=")[0].strip().lower() for r in home}
    for name in ("starlette", "uvicorn", "authlib", "prometheus"):
        assert name not in runtime
    install = (CHECKOUT / "ansible/roles/agent/files/install_agent.py").read_text()
    assert '"tether==" + args["version"]' in install  # no [home] extra on the appliance


def test_store_keeps_hashes_and_revokes(tmp_path):
    store = ApiStore(tmp_path / "api.sqlite3")
    secret = store.create_client("okta", ["authenticate"])
    token_id, token = store.create_token("okta")
    raw = (tmp_path / "api.sqlite3").read_bytes()
    assert secret.encode() not in raw and token.split(".")[1].encode() not in raw
    assert store.verify_client("okta", secret) and not store.verify_client("okta", secret + "x")
    assert store.verify_token(token)["token_id"] == token_id
    assert store.verify_token(token[:-1] + "A") is None
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

    async def nothing(*args):
        return {"ok": False, "code": "unavailable", "error": "no agent"}
    backend = Backend(authenticate=nothing, provision=nothing,
                      status=lambda: {"connectors": [], "directories": []},
                      ready=lambda: (True, "test"), identity=object())
    tokens = Tokens(store, load_signing_key(tmp_path / "k.pem"), "https://testserver")
    return Api(backend, store, tokens), token


def test_scim_is_mounted_with_home_authorize(tmp_path, monkeypatch):
    """When tether.home.api.scim exists its routes live under /scim/v2/{directory},
    with home's token check as ``authorize``."""
    seen = {}

    def scim_routes(*, identity, provision, authorize):
        seen.update(identity=identity, provision=provision)

        async def users(request):
            refused = await authorize(request, "directory:read")
            if refused is not None:
                return refused
            return PlainTextResponse(f"users of {request.path_params['directory']}")
        return [Route("/Users", users)]
    module = types.ModuleType("tether.home.api.scim")
    module.scim_routes = scim_routes
    monkeypatch.setitem(sys.modules, "tether.home.api.scim", module)
    api, token = _api(tmp_path)
    assert isinstance(api.scim_mount()[0], Mount)
    client = TestClient(api.app(), base_url="https://testserver")
    ok = client.get("/scim/v2/corp/Users", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and ok.text == "users of corp"
    refused = client.get("/scim/v2/corp/Users")
    assert refused.status_code == 401
    assert refused.json()["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert seen["provision"] is api.backend.provision


def test_without_scim_module_nothing_is_mounted(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tether.home.api.scim", None)  # import fails
    api, _ = _api(tmp_path)
    assert api.scim_mount() == []
    assert TestClient(api.app()).get("/scim/v2/corp/Users").status_code == 404
