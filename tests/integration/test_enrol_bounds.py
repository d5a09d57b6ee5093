"""Issue 11, points 2 and 3: enrolment and renewal cannot make home grow without bound.

From the attacker's side over real TLS sockets: 2,000 clone-refused enrols pipelined
on one image socket, renewals beyond the rate, and 300 proven re-enrols plus 1,000
renewals of one instance (with the rate limits lifted, in an in-process home, so the
certificate bound itself is what is tested).
"""

from __future__ import annotations

import asyncio

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.exceptions import ConnectionClosed

from homeproc import RawAgent, client_context, enroll, running
from tether import enrolproof, sealing
from tether import protocol as p
from tether.home import enroll as home_enroll
from tether.home.paths import StatePaths
from tether.home.ratelimit import RateLimit
from tether.home.store import Store

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def _csr(key) -> str:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .sign(key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM).decode()


async def _pipeline(agent: RawAgent, bodies: list[dict], op=p.Op.ENROLL) -> tuple[list, int]:
    """Send every request at once, then read answers until home closes the socket."""
    for body in bodies:
        agent.session.request(op, body)
    codes: list[str] = []
    try:
        await agent.flush()
    except ConnectionClosed:
        pass
    try:
        while True:
            for ev in await agent.next_events(20):
                if isinstance(ev, p.ErrorReceived):
                    codes.append(ev.code)
                elif isinstance(ev, p.ResponseReceived):
                    codes.append("ok")
    except ConnectionClosed:
        pass
    return codes, agent.ws.close_code


def test_clone_refused_enrols_do_not_write_rows_and_the_peer_is_closed(home_factory,
                                                                        tmp_path):
    home = home_factory(max_instances=1)
    bundle = home.issue_image()
    assert not isinstance(asyncio.run(enroll(home, bundle, tmp_path, "vm-legit")),
                          p.ErrorReceived)
    key, seal = ec.generate_private_key(ec.SECP256R1()), sealing.generate_private_key()
    csr = _csr(key)
    bodies = [{"csr_pem": csr, "sealing_public_key": sealing.public_key_text(seal),
               "machine": {"fingerprint": f"clone-{n:05d}"}} for n in range(2000)]

    async def attack():
        ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"],
                             tmp_path / "ctx")
        agent = await RawAgent.connect(home.url, ctx)
        await agent.hello(bundle["image_id"], fingerprint="clone")
        first = await _pipeline(agent, bodies)
        again = await RawAgent.connect(home.url, ctx)  # a new socket: the bucket is per image
        await again.hello(bundle["image_id"], fingerprint="clone")
        second = await _pipeline(again, bodies[:5])
        return first, second

    (codes, close_code), (codes2, close_code2) = asyncio.run(attack())
    assert close_code == 1008 and close_code2 == 1008
    assert "clone_refused" in codes and codes[-1] == "busy", codes[-5:]
    assert len(codes) < 2000
    assert codes2[-1] == "busy" and codes2.count("clone_refused") <= 2  # what refilled meanwhile
    status = home.status()
    assert len(status["instances"]) == 1
    rows = [c for c in status["clones"] if c["image_id"] == bundle["image_id"]]
    assert len(rows) == codes.count("clone_refused") + codes2.count("clone_refused") <= 30
    assert "rate limit" in home.log_text()


def test_renewals_beyond_the_rate_are_refused_and_the_socket_closed(home_factory, tmp_path):
    home = home_factory(max_instances=1)
    bundle = home.issue_image()
    instance_id, cert, key_pem, _ = asyncio.run(enroll(home, bundle, tmp_path, "vm-1"))
    key = serialization.load_pem_private_key(key_pem.encode(), None)

    async def renewals():
        agent = await RawAgent.connect(home.url, client_context(bundle["ca_pem"], cert, key_pem,
                                                                tmp_path / "ctx"))
        await agent.hello(bundle["image_id"], instance_id, fingerprint="vm-1")
        return await _pipeline(agent, [{"csr_pem": _csr(key)}] * 40, p.Op.RENEW)

    codes, close_code = asyncio.run(renewals())
    assert close_code == 1008 and codes[-1] == "busy"
    assert codes.count("ok") == home_enroll.Limits().rekeys.burst
    store = Store(StatePaths(home.state).db)
    try:
        assert len(store.valid_instance_certs(instance_id)) <= 2
    finally:
        store.close()


def test_300_reenrols_and_1000_renewals_leave_at_most_two_valid_certificates(home_factory,
                                                                            tmp_path):
    home = home_factory(max_instances=1)
    bundle = home.issue_image()
    home.stop()
    key, seal = ec.generate_private_key(ec.SECP256R1()), sealing.generate_private_key()
    csr = _csr(key)

    def reenrol_body() -> dict:
        body = {"csr_pem": csr, "sealing_public_key": sealing.public_key_text(seal),
                "machine": {"fingerprint": "vm-1"}}
        body["proof"] = enrolproof.sign(key, image_id=bundle["image_id"], fingerprint="vm-1",
                                        csr_pem=csr, sealing_public_key=body["sealing_public_key"])
        return body

    async def churn():
        async with running(home.state) as (server, url):
            lifted = RateLimit(rate=1e9, burst=1e9)
            server.hub.enrol_limits = home_enroll.Limits(refusals=lifted, rekeys=lifted,
                                                         clones=lifted)
            ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"],
                                 tmp_path / "ctx")
            image = await RawAgent.connect(url, ctx)
            await image.hello(bundle["image_id"], fingerprint="vm-1")
            answers = [await image.call(p.Op.ENROLL, reenrol_body()) for _ in range(301)]
            await image.close()
            assert all(isinstance(a, p.ResponseReceived) for a in answers), answers[-1]
            body = answers[-1].message.body
            key_pem = key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
            agent = await RawAgent.connect(url, client_context(bundle["ca_pem"], body["cert_pem"],
                                                               key_pem, tmp_path / "ctx"))
            await agent.hello(bundle["image_id"], body["instance_id"], fingerprint="vm-1")
            renewed = [await agent.call(p.Op.RENEW, {"csr_pem": csr}) for _ in range(1000)]
            await agent.close()
            assert all(isinstance(a, p.ResponseReceived) for a in renewed), renewed[-1]
            return body["instance_id"], renewed[-1].message.body

    instance_id, last = asyncio.run(churn())
    store = Store(StatePaths(home.state).db)
    try:
        valid = store.valid_instance_certs(instance_id)
        issued = store.certs(kind="instance", instance_id=instance_id)
    finally:
        store.close()
    assert len(issued) == 1301
    assert len(valid) == 2  # the certificate the renewing socket used, and the newest
    newest = x509.load_pem_x509_certificate(last["cert_pem"].encode())
    assert format(newest.serial_number, "x") in {c["serial"] for c in valid}
