"""Instance certificate renewal by a real agent process.

The real home issues 24-hour certificates, so "time has passed" is staged: the
agent's certificate is swapped (agent stopped) for one from home's CA that is
already past 2/3 of its life, and a ``scripted_home`` on home's port answers the
``renew`` request with certificates from home's CA (``tether.home.pki``).
"""

from __future__ import annotations

import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tether.agent import instancekeys
from tether.home import pki

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

#: pki back-dates by 5 minutes: with a 2.4-minute lifetime 2/3 has already passed.
DUE_AT_ONCE_HOURS = 0.04


def issue_due_cert(home, state, instance_id: str) -> x509.Certificate:
    ca_key = pki.load_key_pem((home.state / "ca.key").read_bytes())
    ca_cert = pki.load_cert_pem((home.state / "ca.crt").read_bytes())
    keys, _ = instancekeys.load_or_create_keys(state)
    csr = pki.load_csr(instancekeys.make_csr(keys, instance_id))
    return pki.issue_instance(ca_key, ca_cert, csr, instance_id, home.connector,
                              hours=DUE_AT_ONCE_HOURS).cert


def test_agent_renews_a_due_certificate_and_uses_it(home_factory, agent_factory, waiter,
                                                    scripted_home):
    home = home_factory()
    agent = agent_factory(home.issue_image(), args=["--renew-min-interval", "2",
                                                    "--socket-ttl", "3", "--drain-quiet", "0.5"])
    agent.wait_log("socket 1 connected")
    agent.stop()
    instance_id = home.status()["instances"][0]["instance_id"]
    due = issue_due_cert(home, agent.state, instance_id)
    instancekeys.store_cert(agent.state, due)
    assert instancekeys.needs_renewal(instancekeys.load_cert(agent.state))
    home.stop()

    ca_key = pki.load_key_pem((home.state / "ca.key").read_bytes())
    ca_cert = pki.load_cert_pem((home.state / "ca.crt").read_bytes())
    issued = []

    def renew(message):
        assert message.op.value == "renew"
        csr = pki.load_csr(message.body["csr_pem"])
        cert = pki.issue_instance(ca_key, ca_cert, csr, instance_id, home.connector,
                                  hours=DUE_AT_ONCE_HOURS)  # due again at once
        issued.append(cert)
        return {"instance_id": instance_id, "cert_pem": cert.pem,
                "ca_pem": (home.state / "ca.crt").read_text(), "not_after": cert.not_after,
                "renew_after": pki.renew_after(cert)}

    with scripted_home(home, on_request=renew) as peer:
        agent.start()
        agent.wait_log("instance certificate renewed", timeout=30)
        window_start = len(issued)
        time.sleep(5)
        renewals_in_window = len(issued) - window_start
        rotated = agent.log().count("rotated: old socket closed")

    stored = instancekeys.load_cert(agent.state)
    assert stored.serial_number in {c.cert.serial_number for c in issued}
    assert stored.serial_number != due.serial_number
    # the same key: the private key never left the machine and was not replaced
    agent_key = serialization.load_pem_private_key(
        (agent.state / "instance.key").read_bytes(), None)
    assert instancekeys.spki_fingerprint(stored.public_key()) == \
        instancekeys.spki_fingerprint(agent_key.public_key())
    # a certificate that is due at once is not renewed in a tight loop
    assert 1 <= renewals_in_window <= 4, renewals_in_window
    assert all(m.op.value in ("hello", "renew") for m in peer.requests)
    assert rotated >= 1 and agent.alive()
