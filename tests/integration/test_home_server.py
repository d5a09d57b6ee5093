"""A real ``tether-home serve`` over real TLS on 127.0.0.1: handshakes, enrollment,
clones, configuration push, bad frames, revocation, restart.

One home process serves the whole module (starting one costs a second of CPU);
tests that need their own connector policy create it through the CLI.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.exceptions import ConnectionClosed, InvalidStatus

from homeproc import HomeProcess, RawAgent, client_context, enroll
from tether import configsig, sealing
from tether import protocol as p

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with HomeProcess.start(tmp_path_factory.mktemp("home"), connector="acme",
                           max_instances=1) as server:
        yield server


@pytest.fixture
def bundle(home):
    return home.issue_image()


def run(coro):
    return asyncio.run(coro)


def _pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _cert(subject_key, issuer_key, issuer_name, days_from: float, days_to: float) -> str:
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")]))
            .issuer_name(issuer_name).public_key(subject_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=days_from))
            .not_valid_after(now + dt.timedelta(days=days_to))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(issuer_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


async def _refused(home, ctx) -> Exception:
    """Connect and say hello; return the exception that stopped us."""
    try:
        agent = await RawAgent.connect(home.url, ctx)
        await agent.hello("x")
    except (ssl.SSLError, ConnectionClosed, InvalidStatus, OSError, EOFError) as exc:
        return exc
    except Exception as exc:  # websockets wraps TLS failures in InvalidMessage
        return exc
    raise AssertionError("home accepted a connection it must refuse")


def _wait_log(home, needle: str, timeout: float = 10.0) -> str:
    async def wait():
        for _ in range(int(timeout * 10)):
            text = home.log_text()
            if needle in text:
                return text
            await asyncio.sleep(0.1)
        raise AssertionError(f"{needle!r} not in home's log:\n{home.log_text()[-3000:]}")
    return run(wait())


# ------------------------------------------------------------- handshakes


def test_no_client_certificate_is_refused_and_logged(home, tmp_path):
    before = home.log_text().count("PEER_DID_NOT_RETURN_A_CERTIFICATE")
    run(_refused(home, client_context(home.ca_cert, None, None, tmp_path)))
    _wait_log(home, "PEER_DID_NOT_RETURN_A_CERTIFICATE")
    assert home.log_text().count("PEER_DID_NOT_RETURN_A_CERTIFICATE") > before


def test_certificate_from_another_ca_is_refused(home, tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tether home CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    ctx = client_context(home.ca_cert, _cert(key, ca_key, ca_name, -1, 30), _pem(key), tmp_path)
    run(_refused(home, ctx))
    _wait_log(home, "CERTIFICATE_VERIFY_FAILED")


def test_expired_certificate_from_home_ca_is_refused(home, tmp_path):
    ca_key = serialization.load_pem_private_key((home.state / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((home.state / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    ctx = client_context(home.ca_cert, _cert(key, ca_key, ca_cert.subject, -10, -1), _pem(key),
                         tmp_path)
    run(_refused(home, ctx))
    text = _wait_log(home, "certificate has expired")
    assert "tls_refused" in text


def test_unknown_certificate_from_home_ca_is_refused_with_403(home, tmp_path):
    """Signed by home's CA but not in its database (e.g. a stolen CA backup)."""
    ca_key = serialization.load_pem_private_key((home.state / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((home.state / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    ctx = client_context(home.ca_cert, _cert(key, ca_key, ca_cert.subject, -1, 10), _pem(key),
                         tmp_path)
    exc = run(_refused(home, ctx))
    assert isinstance(exc, InvalidStatus) and exc.response.status_code == 403
    _wait_log(home, "reason=unknown_certificate")


def test_wrong_subprotocol_is_refused_with_400(home, bundle, tmp_path):
    ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)

    async def go():
        try:
            await RawAgent.connect(home.url, ctx, subprotocols=["chat"])
        except InvalidStatus as exc:
            return exc
        raise AssertionError("accepted without the tether subprotocol")
    exc = run(go())
    assert exc.response.status_code == 400
    assert p.SUBPROTOCOL.encode() in exc.response.body


def test_revoked_image_certificate_is_refused(home, bundle, tmp_path):
    home.cli("revoke", bundle["cert_serial"], "--reason", "leaked")
    ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)
    exc = run(_refused(home, ctx))
    assert isinstance(exc, InvalidStatus) and exc.response.status_code == 403
    assert b"revoked" in exc.response.body
    _wait_log(home, "reason=revoked")


def test_revoke_closes_live_socket(home, bundle, tmp_path):
    ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        assert isinstance(await agent.hello(bundle["image_id"]), p.ResponseReceived)
        out = await asyncio.to_thread(home.cli, "revoke", bundle["cert_serial"])
        assert "closed 1 socket" in out.stdout
        with pytest.raises(ConnectionClosed) as info:
            await agent.next_events()
        return info.value
    closed = run(go())
    assert closed.rcvd.code == 1008


# ------------------------------------------------------------- bad frames


@pytest.mark.parametrize("frame, code", [
    ("{not json", "malformed"),
    (b"\xff\x00binary", "malformed"),
    ('{"v":1,"id":"a1","kind":"request","op":"format_disk","ts":0,"body":{}}', "unknown_op"),
    ('{"v":1,"id":"a2","kind":"request","op":"hello","ts":"now","body":{}}', "bad_type"),
    ('{"v":9,"id":"a3","kind":"request","op":"hello","ts":1,"body":{}}', "unsupported_version"),
])
def test_bad_frames_get_specific_errors_and_the_socket_lives(home, bundle, tmp_path, frame, code):
    ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        await agent.send_raw(frame)
        reply = await agent.recv_message()
        hello = await agent.hello(bundle["image_id"])  # the same socket still works
        await agent.close()
        return reply, hello
    reply, hello = run(go())
    assert reply.kind is p.Kind.ERROR and reply.body["code"] == code
    assert isinstance(hello, p.ResponseReceived)


def test_frame_before_hello_replay_and_stale(home, bundle, tmp_path):
    ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        beat = p.encode(p.Message(id="early1", kind=p.Kind.EVENT, op=p.Op.HEARTBEAT,
                                  ts=agent.session.now(), body={}))
        await agent.send_raw(beat)
        early = await agent.recv_message()
        old = p.encode(p.Message(id="old1", kind=p.Kind.REQUEST, op=p.Op.HELLO, ts=1000.0,
                                 body={"agent_version": "t", "image_id": bundle["image_id"]}))
        await agent.send_raw(old)
        stale = await agent.recv_message()
        hello = p.Message(id="hello1", kind=p.Kind.REQUEST, op=p.Op.HELLO,
                          ts=agent.session.now(),
                          body={"agent_version": "t", "image_id": bundle["image_id"]})
        await agent.send_raw(p.encode(hello))
        first = await agent.recv_message()
        await agent.send_raw(p.encode(hello))
        replay = await agent.recv_message()
        await agent.close()
        return early, stale, first, replay
    early, stale, first, replay = run(go())
    assert early.body["code"] == "not_hello"
    assert stale.body["code"] == "stale" and "server_time" in stale.body
    assert first.kind is p.Kind.RESPONSE
    assert replay.body["code"] == "replay"


def test_oversized_frames(home, bundle, tmp_path):
    ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        await agent.send_raw("x" * (p.MAX_FRAME_BYTES + 10))
        too_large = await agent.recv_message()
        await agent.send_raw("x" * (3 * p.MAX_FRAME_BYTES))
        with pytest.raises(ConnectionClosed) as info:
            await agent.recv_message()
        return too_large, info.value
    too_large, closed = run(go())
    assert too_large.body["code"] == "too_large"
    assert closed.rcvd.code == 1009


def test_image_credential_may_only_enroll(home, bundle, tmp_path):
    ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        await agent.hello(bundle["image_id"])
        ev = await agent.call(p.Op.RENEW, {"csr_pem": "x"})
        await agent.send_raw(p.encode(p.Message(
            id="hello2", kind=p.Kind.REQUEST, op=p.Op.HELLO, ts=agent.session.now(),
            body={"agent_version": "t", "image_id": "other"})))
        wrong = await agent.recv_message()
        await agent.close()
        return ev, wrong
    ev, wrong = run(go())
    assert isinstance(ev, p.ErrorReceived) and ev.code == "unauthorized"
    assert wrong.body["code"] == "duplicate_hello"


# ---------------------------------------------- enrollment, clones, config


def test_enroll_then_clone_refused_and_flagged(home, bundle, tmp_path):
    first = run(enroll(home, bundle, tmp_path, fingerprint="vm-uuid-1"))
    instance_id = first[0]
    again = run(enroll(home, bundle, tmp_path, fingerprint="vm-uuid-1"))
    assert again[0] == instance_id  # same machine enrolling again keeps its identity
    clone = run(enroll(home, bundle, tmp_path, fingerprint="vm-uuid-2"))
    assert isinstance(clone, p.ErrorReceived) and clone.code == "clone_refused"
    assert clone.message.body["limit"] == 1
    status = home.status()
    flagged = [c for c in status["clones"] if c["image_id"] == bundle["image_id"]]
    assert flagged and flagged[0]["machine_fingerprint"] == "vm-uuid-2"
    assert "flagged clones (1" in home.cli("status").stdout or len(status["clones"]) >= 1


def test_bad_csr_is_refused(home, bundle, tmp_path):
    ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        await agent.hello(bundle["image_id"])
        ev = await agent.call(p.Op.ENROLL, {"csr_pem": "garbage", "sealing_public_key": "k",
                                            "machine": {"fingerprint": "m"}})
        await agent.close()
        return ev
    ev = run(go())
    assert ev.code == "bad_csr"


def test_instance_checkin_config_push_and_status(home, tmp_path):
    bundle = home.issue_image()
    instance_id, cert_pem, key_pem, seal_key = run(enroll(home, bundle, tmp_path, "vm-a"))
    config = {"directories": [{"name": "ad", "url": "ldaps://dc.example.invalid",
                               "bind_password": "hunter2"}]}
    home.set_config(config)
    ctx = client_context(bundle["ca_pem"], cert_pem, key_pem, tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        hello = await agent.hello(bundle["image_id"], instance_id, fingerprint="vm-a",
                                  selfcheck={"verdict": "degraded", "measured": {"vcpu": 2},
                                             "shortfalls": [{"message": "2 vCPU < 4"}]},
                                  listening=[])
        push = agent.inbox.pop(0) if agent.inbox else (await agent.next_events())[0]
        document = push.message.body["config"]
        agent.session.respond(push.message, {"version": document["payload"]["version"],
                                             "applied": True})
        agent.session.event(p.Op.CONFIG_ACK, {"version": document["payload"]["version"],
                                              "status": "applied"})
        agent.session.event(p.Op.HEARTBEAT, {"uptime": 1.0, "listening": []})
        await agent.flush()
        status = await asyncio.to_thread(home.status)
        await agent.close()
        return hello, push, status
    hello, push, status = run(go())
    body = hello.message.body
    assert body["role"] == "instance" and body["instance_id"] == instance_id
    key = configsig.load_public_key(body["config_key_pem"])
    doc = configsig.verify_config(key, push.message.body["config"], connector="acme",
                                  instance_id=instance_id)
    assert "hunter2" not in json.dumps(push.message.body)
    opened = configsig.unseal_secrets(doc.config,
                                      lambda s, aad: sealing.unseal(seal_key, s, aad))
    assert opened == config
    row = next(i for i in status["instances"] if i["instance_id"] == instance_id)
    assert row["selfcheck"]["verdict"] == "degraded"
    assert row["agent_version"] == "test" and row["listening"] == []
    assert row["connected_sockets"] == 1 and row["last_seen"] is not None
    assert row["config_version"] == doc.version


def test_config_set_pushes_to_connected_instance(home, tmp_path):
    bundle = home.issue_image()
    instance_id, cert_pem, key_pem, _ = run(enroll(home, bundle, tmp_path, "vm-b"))
    ctx = client_context(bundle["ca_pem"], cert_pem, key_pem, tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        latest = json.loads((await asyncio.to_thread(home.cli, "status", "--json")).stdout)
        version = next(c for c in latest["connectors"] if c["name"] == "acme")["config_version"]
        await agent.hello(bundle["image_id"], instance_id, config_version=version)
        if version is not None:  # home confirmed nothing for this instance yet: it pushes
            first = agent.inbox.pop(0) if agent.inbox else (await agent.next_events())[0]
            agent.session.respond(first.message, {"version": version, "applied": True})
            agent.session.event(p.Op.CONFIG_ACK, {"version": version, "status": "applied"})
            await agent.flush()
        setter = asyncio.create_task(asyncio.to_thread(home.set_config, {"schedule": {"x": 1}}))
        (push,) = await agent.next_events()
        agent.session.fail(push.message, p.ErrorCode.BAD_SIGNATURE, "test says no")
        await agent.flush()
        out = await setter
        await agent.close()
        return push, out
    push, out = run(go())
    assert push.message.op is p.Op.CONFIG_PUSH
    assert "configuration version" in out
    status = home.status()
    row = next(i for i in status["instances"] if i["instance_id"] == instance_id)
    assert row["config_status"] == "rejected:bad_signature"


def test_renew_issues_new_certificate(home, tmp_path):
    bundle = home.issue_image()
    instance_id, cert_pem, key_pem, _ = run(enroll(home, bundle, tmp_path, "vm-c"))
    ctx = client_context(bundle["ca_pem"], cert_pem, key_pem, tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "i")]))
           .sign(key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM).decode()

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        await agent.hello(bundle["image_id"], instance_id, config_version=10**6)
        ev = await agent.call(p.Op.RENEW, {"csr_pem": csr})
        await agent.close()
        return ev
    ev = run(go())
    assert ev.message.body["instance_id"] == instance_id
    new = x509.load_pem_x509_certificate(ev.message.body["cert_pem"].encode())
    old = x509.load_pem_x509_certificate(cert_pem.encode())
    assert new.serial_number != old.serial_number
    lifetime = new.not_valid_after_utc - new.not_valid_before_utc
    assert lifetime <= dt.timedelta(hours=25)
    assert ev.message.body["renew_after"] < new.not_valid_after_utc.timestamp()


def test_server_survives_everything_above(home):
    live = home.live()
    assert live and live["pid"] == home.proc.pid
    assert home.proc.poll() is None
    assert "Traceback" not in home.log_text()


def test_restart_keeps_state(home, tmp_path):
    bundle = home.issue_image()
    instance_id, cert_pem, key_pem, _ = run(enroll(home, bundle, tmp_path, "vm-d"))
    home.restart()
    ctx = client_context(bundle["ca_pem"], cert_pem, key_pem, tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        ev = await agent.hello(bundle["image_id"], instance_id, config_version=10**6)
        await agent.close()
        return ev
    ev = run(go())
    assert ev.message.body["instance_id"] == instance_id


def test_peer_that_keeps_violating_is_dropped(home, tmp_path):
    bundle = home.issue_image()
    ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        replies = 0
        with pytest.raises(ConnectionClosed) as info:
            for _ in range(200):
                await agent.send_raw("garbage")
                await agent.recv_message()
                replies += 1
        return replies, info.value
    replies, closed = run(go())
    assert closed.rcvd.code == 1008
    assert 40 <= replies <= 60
    assert home.proc.poll() is None


def test_revoke_instance_closes_and_refuses(home, tmp_path):
    bundle = home.issue_image()
    instance_id, cert_pem, key_pem, _ = run(enroll(home, bundle, tmp_path, "vm-r"))
    ctx = client_context(bundle["ca_pem"], cert_pem, key_pem, tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        await agent.hello(bundle["image_id"], instance_id, config_version=10**6)
        out = await asyncio.to_thread(home.cli, "revoke", "--instance", instance_id)
        with pytest.raises(ConnectionClosed):
            for _ in range(5):  # home's configuration push may come first (issue 11)
                await agent.next_events()
        return out.stdout, await _refused(home, ctx)
    out, refused = run(go())
    assert "revoked instance certificate" in out and "closed 1 socket" in out
    assert isinstance(refused, InvalidStatus) and refused.response.status_code == 403
    row = next(i for i in home.status()["instances"] if i["instance_id"] == instance_id)
    assert row["cert_revoked"] and row["connected_sockets"] == 0


def test_silent_sockets_and_socket_floods_are_limited(tmp_path):
    with HomeProcess.start(tmp_path, serve_args=("--hello-timeout", "1",
                                                 "--max-sockets-per-agent", "2")) as strict:
        bundle = strict.issue_image()
        image_ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"],
                                   tmp_path)
        instance_id, cert_pem, key_pem, _ = run(enroll(strict, bundle, tmp_path, "vm-s"))
        ctx = client_context(bundle["ca_pem"], cert_pem, key_pem, tmp_path)

        async def go():
            silent = await RawAgent.connect(strict.url, image_ctx)
            with pytest.raises(ConnectionClosed) as info:
                await silent.next_events(timeout=10)
            first = await RawAgent.connect(strict.url, ctx)
            second = await RawAgent.connect(strict.url, ctx)
            for agent in (first, second):
                await agent.hello(bundle["image_id"], instance_id, config_version=10**6)
            with pytest.raises(InvalidStatus) as refused:
                await RawAgent.connect(strict.url, ctx)
            await first.close()
            await second.close()
            return info.value, refused.value
        closed, refused = run(go())
        assert closed.rcvd.code == 1008
        assert refused.response.status_code == 429
        assert "no hello within 1 s" in strict.log_text()


def test_oversized_selfcheck_in_hello_is_refused(home, tmp_path):
    bundle = home.issue_image()
    ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        # Forged: the agent's own Session refuses to send a field over its limit.
        ev = await agent.send_forged(p.Op.HELLO, {
            "agent_version": "test", "image_id": bundle["image_id"],
            "selfcheck": {"verdict": "ok", "junk": "x" * 100_000}})
        retry = await agent.hello(bundle["image_id"])  # a refused hello may be retried
        await agent.close()
        return ev, retry
    ev, retry = run(go())
    assert ev.kind is p.Kind.ERROR and ev.body["code"] == "bad_type"
    assert "selfcheck" in ev.body["detail"]
    assert isinstance(retry, p.ResponseReceived)


def test_tls_below_1_3_is_refused(home, bundle, tmp_path):
    ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    run(_refused(home, ctx))
    _wait_log(home, "tls_refused reason=UNSUPPORTED_PROTOCOL")


def test_status_after_a_crash_shows_no_sockets(tmp_path):
    with HomeProcess.start(tmp_path) as crashing:
        bundle = crashing.issue_image()
        instance_id, cert_pem, key_pem, _ = run(enroll(crashing, bundle, tmp_path, "vm-k"))
        ctx = client_context(bundle["ca_pem"], cert_pem, key_pem, tmp_path)

        async def connect():
            agent = await RawAgent.connect(crashing.url, ctx)
            await agent.hello(bundle["image_id"], instance_id, config_version=10**6)
            status = await asyncio.to_thread(crashing.status)
            crashing.kill()
            return status
        up = run(connect())
        down = crashing.status()
        crashing.serve()  # starts again over the stale socket file and rows
        again = crashing.status()
    assert len(up["sockets"]) == 1
    assert down["server"] == {"running": False} and down["sockets"] == []
    assert again["server"]["pid"] != up["server"]["pid"] and again["sockets"] == []
