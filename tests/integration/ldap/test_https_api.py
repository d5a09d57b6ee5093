"""Home's HTTPS API (issue 15) against real processes only.

One real ``tether-home serve --api-listen 127.0.0.1:0``, one real enrolled
``tether-agent run`` serving directory ``corp`` from the session's real slapd
(seed data: u000..u019, nested groups), clients made with ``tether-home
api-client``. Requests go over real TLS (httpx, home's CA as the only anchor);
the status page is loaded in a real headless Chromium. No timing asserts.

The shared slapd locks an account after 5 failures (ppolicy): wrong passwords
here use u017/u018 a few times at most; throttling is shown with names that do
not exist, and with u017, whose lock the throttle must prevent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import socket
import ssl
import time

import httpx
import ldap3
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey

from e2erig import GROUPS_F, OPENLDAP_MAPPING, USERS_F, Rig, directory_entry, ldap_rows, wait_for
from homeproc import HomeProcess
from ldapfix_helpers import admin_connection, slapd_config
from ldapfix_slapd import SUFFIX

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"


class Api:
    """The API of the running home, over TLS with home's CA as the only anchor."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        live = rig.home.live()
        self.port = int(live["api_address"].rsplit(":", 1)[1])
        self.base = f"https://127.0.0.1:{self.port}"
        self.ctx = ssl.create_default_context(cafile=str(rig.home.ca_cert))
        self.http = httpx.Client(base_url=self.base, verify=self.ctx, timeout=60)

    def client(self, name: str, *scopes: str) -> str:
        out = self.rig.cli("api-client", "create", name, *sum((["--scope", s] for s in scopes), []))
        assert out.returncode == 0, out.stderr
        return re.search(r"client_secret: (\S+)", out.stdout).group(1)

    def static_token(self, name: str) -> str:
        out = self.rig.cli("api-client", "token", name)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def jwt(self, name: str, secret: str, scope: str | None = None) -> httpx.Response:
        form = {"grant_type": "client_credentials", **({"scope": scope} if scope else {})}
        return self.http.post("/oauth2/token", data=form, auth=(name, secret))

    def auth(self, token: str, username: str, password: str, directory: str = "corp"):
        return self.http.post(f"/v1/directories/{directory}/authenticate",
                              json={"username": username, "password": password},
                              headers={"Authorization": f"Bearer {token}"})

    def audit(self, client: str | None = None) -> list[dict]:
        args = ["audit", "--json", "--limit", "10000"] + (["--client", client] if client else [])
        out = self.rig.cli(*args)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def api(slapd, test_ca, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("https-api")
    home = HomeProcess.start(tmp / "home", connector="c-a", cluster="east",
                             serve_args=("--api-listen", "127.0.0.1:0"))
    rig = Rig(home, ("c-a",), "east")
    try:
        agent = rig.agent("c-a")
        rig.configure({"directories": [directory_entry("corp", slapd_config(slapd, test_ca,
                                                                               page_size=50))]})
        conn = admin_connection(slapd, test_ca)
        try:
            rig.wait_store_equals("corp", lambda: ldap_rows(conn, SUFFIX, USERS_F, GROUPS_F,
                                                            OPENLDAP_MAPPING))
        finally:
            conn.unbind()
        wait_for(lambda: (rig.directory_status("corp") or {}).get("leader") == agent.instance_id(),
                 60, "the agent to lead corp")
        client = Api(rig)
        client.agent, client.slapd, client.test_ca = agent, slapd, test_ca
        yield client
        client.http.close()
    finally:
        rig.stop()


def test_certificate_and_tls_versions(api):
    """Its own certificate from home's CA, TLS 1.2 and 1.3, no client certificate asked."""
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.create_default_context(cafile=str(api.rig.home.ca_cert))
        ctx.minimum_version = ctx.maximum_version = version
        with socket.create_connection(("127.0.0.1", api.port)) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                                     ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert (api.rig.state / "api.crt").exists() and (api.rig.state / "api.key").stat().st_mode & 0o077 == 0
    assert api.http.get("/healthz").text == "ok\n"
    ready = api.http.get("/readyz")
    assert ready.status_code == 200 and ready.text.startswith("ready")


def test_token_lifecycle(api):
    secret = api.client("life", "status:read", "authenticate")
    meta = api.http.get("/.well-known/oauth-authorization-server").json()
    assert meta["token_endpoint"].endswith("/oauth2/token")
    assert meta["grant_types_supported"] == ["client_credentials"]
    assert "client_secret_basic" in meta["token_endpoint_auth_methods_supported"]

    issued = api.jwt("life", secret)
    assert issued.status_code == 200, issued.text
    doc = issued.json()
    assert doc["token_type"] == "Bearer" and 0 < doc["expires_in"] <= 3600
    header = json.loads(base64.urlsafe_b64decode(doc["access_token"].split(".")[0] + "=="))
    assert header["typ"] == "at+jwt"  # RFC 9068
    token = doc["access_token"]
    assert api.http.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # client_secret_post works too; a narrower scope gives a narrower token
    post = api.http.post("/oauth2/token", data={"grant_type": "client_credentials",
                                                "client_id": "life", "client_secret": secret,
                                                "scope": "status:read"})
    assert post.status_code == 200 and post.json()["scope"] == "status:read"
    narrow = post.json()["access_token"]
    denied = api.auth(narrow, "u003", "pw003")
    assert denied.status_code == 403 and 'error="insufficient_scope"' in denied.headers["www-authenticate"]

    # the RFC's errors
    wrong = api.jwt("life", "not-the-secret")
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    grant = api.http.post("/oauth2/token", data={"grant_type": "password"}, auth=("life", secret))
    assert grant.status_code == 400 and grant.json()["error"] == "unsupported_grant_type"
    scope = api.jwt("life", secret, scope="directory:write")
    assert scope.status_code == 400 and scope.json()["error"] == "invalid_scope"
    missing = api.http.get("/metrics")
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")

    # forged (another key) and expired (home's own key) tokens are refused
    claims = jwt.decode(token, ECKey.import_key((api.rig.state / "api-jwt.key").read_bytes())).claims
    other = ECKey.import_key(ec.generate_private_key(ec.SECP256R1()))
    forged = jwt.encode({"alg": "ES256", "typ": "at+jwt"}, claims, other)
    home_key = ECKey.import_key((api.rig.state / "api-jwt.key").read_bytes())
    expired = jwt.encode({"alg": "ES256", "typ": "at+jwt"},
                         {**claims, "iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600},
                         home_key)
    untyped = jwt.encode({"alg": "ES256"}, claims, home_key)
    for bad in (forged, expired, untyped, token[:-4] + "AAAA", "tht_0000.nope"):
        refused = api.http.get("/metrics", headers={"Authorization": f"Bearer {bad}"})
        assert refused.status_code == 401, bad
        assert 'error="invalid_token"' in refused.headers["www-authenticate"]

    # long-lived token; revoking the client refuses both kinds at once
    static = api.static_token("life")
    assert static.startswith("tht_")
    assert api.http.get("/metrics", headers={"Authorization": f"Bearer {static}"}).status_code == 200
    listed = api.rig.cli("api-client", "list")
    assert "life\tactive" in listed.stdout and "tokens=1" in listed.stdout
    assert secret not in (api.rig.state / "api.sqlite3").read_bytes().decode("latin-1")
    assert api.rig.cli("api-client", "revoke", "life").returncode == 0
    for credential in (token, static):
        after = api.http.get("/metrics", headers={"Authorization": f"Bearer {credential}"})
        assert after.status_code == 401, credential
    assert api.jwt("life", secret).status_code == 401

    rows = api.audit("life")
    ops = [(r["op"], r["outcome"]) for r in rows]
    assert ("token", "issued") in ops and ("token", "invalid_client") in ops
    assert ("metrics", "ok") in ops and ("metrics", "refused") in ops
    assert all(r["at"] and r["peer"].startswith("127.0.0.1:") for r in rows)


def test_authenticate_endpoint(api):
    api.client("idp", "authenticate")
    token = api.static_token("idp")
    ok = api.auth(token, "u000", "pw000")
    assert ok.status_code == 200, ok.text
    doc = ok.json()
    assert doc["outcome"] == "success" and doc["dn"] == f"uid=u000,{PEOPLE}"
    assert set(doc["groups"]) == {f"cn={g},{GROUPS}" for g in ("staff", "admins", "nested", "outer")}
    assert api.auth(token, "u018", "not-the-password").json()["outcome"] == "wrong_password"
    assert api.auth(token, "nobody-at-all", "pw").json()["outcome"] == "unknown_user"
    assert api.auth(token, "expired1", "pw-expired").json()["outcome"] == "expired"

    unknown_dir = api.auth(token, "u000", "pw000", directory="nowhere")
    assert unknown_dir.status_code == 404 and unknown_dir.json()["error"] == "not_found"
    for body in ('{"username": "u000"}', '{"username": "u000", "password": ""}', "not json",
                 '["u000", "pw000"]'):
        bad = api.http.post("/v1/directories/corp/authenticate", content=body,
                            headers={"Authorization": f"Bearer {token}"})
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_request", body

    # throttled per user name: 3 failures, then 429 with Retry-After, other names unaffected
    outcomes = [api.auth(token, "ghost-1", f"guess{i}") for i in range(5)]
    assert [r.status_code for r in outcomes] == [200, 200, 200, 429, 429]
    assert int(outcomes[-1].headers["retry-after"]) > 0
    assert api.auth(token, "u001", "pw001").json()["outcome"] == "success"

    # the API cannot lock an account: u017 gets 3 wrong passwords through, the rest are
    # refused by home, and the directory still lets u017 in (ppolicy locks at 5)
    codes = [api.auth(token, "u017", f"wrong-{i}").status_code for i in range(8)]
    assert codes == [200, 200, 200] + [429] * 5
    server = ldap3.Server("localhost", port=api.slapd.tls_port, use_ssl=True,
                          tls=ldap3.Tls(validate=ssl.CERT_REQUIRED,
                                        ca_certs_file=str(api.test_ca.ca_file)))
    direct = ldap3.Connection(server, f"uid=u017,{PEOPLE}", "pw017")
    assert direct.bind(), direct.result
    direct.unbind()

    # no token / a token without the scope: nothing reaches the directory
    assert api.http.post("/v1/directories/corp/authenticate",
                         json={"username": "u000", "password": "pw000"}).status_code == 401
    rows = api.audit("idp")
    assert [r["outcome"] for r in rows if r["op"] == "authenticate"][:4] == [
        "success", "wrong_password", "unknown_user", "expired"]
    assert any(r["outcome"] == "throttled" for r in rows)
    everything = json.dumps(api.audit()) + api.rig.home.log_text()
    for password in ("pw000", "not-the-password", "guess4", "wrong-7", "pw-expired"):
        assert password not in everything


def test_metrics(api):
    api.client("prom", "status:read", "authenticate")
    token = api.static_token("prom")
    assert api.auth(token, "u002", "pw002").json()["outcome"] == "success"
    text = api.http.get("/metrics", headers={"Authorization": f"Bearer {token}"}).text
    assert 'tether_connected_instances{connector="c-a"} 1.0' in text
    assert 'tether_api_requests_total{op="authenticate",outcome="success"}' in text
    assert 'tether_api_request_seconds_bucket{le="0.01",op="authenticate"}' in text
    assert re.search(r'tether_directory_entries\{directory="corp",kind="user"\} \d+', text)
    assert 'tether_directory_sync_lag_seconds{directory="corp"}' in text
    assert re.search(r"^tether_agent_sockets [1-9]", text, re.M)


def test_status_page_in_chromium(api, tmp_path):
    """Headless Chromium signs in with a status:read token and sees the connected instance."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    api.client("ops", "status:read")
    token = api.static_token("ops")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-proxy-server", "--ignore-certificate-errors",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.set_page_load_timeout(60)
        browser.get(f"{api.base}/status")
        assert "status:read" in browser.find_element(By.TAG_NAME, "form").text
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.ID, "sign-in").click()
        iid = api.agent.instance_id()
        row = browser.find_element(By.CSS_SELECTOR, f'tr.instance[data-instance="{iid}"]')
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        assert cells[0] == iid and cells[1] == "connected"
        assert "127.0.0.1" in cells[3] and cells[5] == "n/a" and cells[9] in ("ok", "degraded")
        assert "c-a" in browser.find_element(By.ID, "connector-c-a").text
        corp = browser.find_element(By.CSS_SELECTOR, "tr.directory").text
        assert corp.startswith("corp") and iid in corp
    finally:
        browser.quit()


def test_bad_input_leaves_everything_alone(api):
    api.client("rude", "authenticate", "status:read")
    token = api.static_token("rude")
    before = len(api.audit("rude"))
    # oversized body: 413 before anything reads it
    big = api.http.post("/v1/directories/corp/authenticate", content=b"x" * 200_000,
                        headers={"Authorization": f"Bearer {token}",
                                 "content-type": "application/json"})
    assert big.status_code == 413
    # a slow client that never finishes its request head is disconnected
    ctx = ssl.create_default_context(cafile=str(api.rig.home.ca_cert))
    with socket.create_connection(("127.0.0.1", api.port), timeout=60) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST /v1/directories/corp/authenticate HTTP/1.1\r\nHost: x\r\n")
        assert tls.recv(1024) == b""  # closed by home, no answer
    # 1,000 concurrent connections: each gets an HTTP answer, the agents' listener keeps going
    statuses = asyncio.run(_flood(api, 1000))
    assert len(statuses) == 1000 and set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) > 0
    assert api.auth(token, "u004", "pw004").json()["outcome"] == "success"
    live = api.rig.home.live()
    assert live["sockets"] >= 1 and api.agent.alive()
    assert "socket 1 connected" in api.agent.log()
    rows = api.audit("rude")[before:]
    assert [r["outcome"] for r in rows if r["op"] == "authenticate"][-1] == "success"


async def _flood(api: Api, n: int) -> list[int]:
    """``n`` TLS connections open at once: each asks GET /healthz (keep-alive) as soon as
    it is up, and all stay open until the last one got its answer."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    ctx = ssl.create_default_context(cafile=str(api.rig.home.ca_cert))
    handshakes = asyncio.Semaphore(100)
    answered: list[int] = []
    everyone = asyncio.Event()

    async def one() -> int:
        async with handshakes:
            reader, writer = await asyncio.open_connection("127.0.0.1", api.port, ssl=ctx,
                                                           server_hostname="127.0.0.1")
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 120)
            answered.append(1)
            if len(answered) == n:
                everyone.set()
            await asyncio.wait_for(everyone.wait(), 300)
            return int(line.split()[1])
        finally:
            writer.close()
    return list(await asyncio.gather(*(one() for _ in range(n))))
