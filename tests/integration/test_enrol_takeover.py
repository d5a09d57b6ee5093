"""Issue 11, point 1: the image credential alone must not take over an enrolled instance.

Every copy of an image carries the same image credential, and copies leak, so the
attacker here holds it: a real ``tether-home serve`` and a real ``tether-agent run``
(the victim) on loopback, the attacker a bare protocol client (:class:`RawAgent`).
The attack: hello with the image certificate, ``enroll`` with the attacker's own CSR
and sealing key and the victim's machine fingerprint (shown by ``status``), then a
second socket with the certificate home issued, to receive the configuration sealed
to the attacker's key. The defended outcome: a refused clone, visible in ``status``
and the log, and the victim keeps its keys, certificate and configuration.

The legitimate ways back stay open: an agent whose certificate expired while home
was away re-enrolls with a proof signed by its current instance key; an appliance
that lost its state needs the operator's ``tether-home instance reset``.
"""

from __future__ import annotations

import asyncio

import pytest

from homeproc import RawAgent, client_context, enroll
from tether import configsig, sealing
from tether import protocol as p
from tether.agent import instancekeys
from tether.home import pki
from tether.home.paths import StatePaths
from tether.home.store import Store

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

SECRET = "Bind-Pa55!"
CONFIG = {"directories": [{"name": "corp-ad", "bind_password": SECRET}],
          "agent": {"note": "v1"}}


def instance_row(home, instance_id: str) -> dict:
    """The instance's database row, read directly (status --json has no sealing key)."""
    store = Store(StatePaths(home.state).db)
    try:
        return store.instance(instance_id)
    finally:
        store.close()


def valid_certs(home, instance_id: str) -> list[dict]:
    store = Store(StatePaths(home.state).db)
    try:
        return store.valid_instance_certs(instance_id)
    finally:
        store.close()


async def steal_configuration(home, bundle: dict, enrolled: tuple, tmp) -> str:
    """Continue the attack after a successful enroll: a rejected ``config.ack`` makes
    home forget the victim applied the configuration, and a second socket with the new
    certificate receives it sealed to the attacker; returns the unsealed bind password."""
    instance_id, cert_pem, key_pem, seal_key = enrolled
    context = client_context(bundle["ca_pem"], cert_pem, key_pem, tmp / "stolen")
    first = await RawAgent.connect(home.url, context)
    await first.hello(bundle["image_id"], instance_id, fingerprint="attacker")
    first.session.event(p.Op.CONFIG_ACK, {"version": None, "status": "rejected"})
    await first.flush()
    await asyncio.sleep(0.5)
    agent = await RawAgent.connect(home.url, context)
    try:
        await agent.hello(bundle["image_id"], instance_id, fingerprint="attacker",
                          socket_index=1)
        for _ in range(20):
            pushes = [ev for ev in agent.inbox if isinstance(ev, p.RequestReceived)
                      and ev.message.op is p.Op.CONFIG_PUSH]
            if pushes:
                document = pushes[0].message.body["config"]
                config = configsig.unseal_secrets(
                    document["payload"]["config"],
                    lambda text, aad: sealing.unseal(seal_key, text, aad))
                return config["directories"][0]["bind_password"]
            agent.inbox.extend(await agent.next_events(10))
        return "(no push)"
    finally:
        await agent.close()
        await first.close()


def test_image_credential_cannot_take_over_an_enrolled_instance(home_factory, agent_factory,
                                                                waiter, tmp_path):
    home = home_factory(max_instances=1)
    bundle = home.issue_image()
    victim = agent_factory(bundle, name="victim")
    victim.wait_log("socket 1 connected")
    home.set_config(CONFIG)
    victim.wait_log("configuration v1 applied")
    (row,) = home.status()["instances"]
    victim_id = row["instance_id"]
    before = instance_row(home, victim_id)

    got = asyncio.run(enroll(home, bundle, tmp_path / "attacker", victim.fingerprint))
    if not isinstance(got, p.ErrorReceived):
        stolen = asyncio.run(steal_configuration(home, bundle, got, tmp_path))
        pytest.fail(f"takeover: home gave the attacker instance {got[0]} (victim "
                    f"{victim_id}) and pushed it the configuration: bind_password={stolen!r}")
    assert got.code == "clone_refused", got.message.body
    detail = got.message.body["detail"]
    assert f"tether-home instance reset {victim_id}" in detail, detail

    # the victim keeps its keys, certificate and configuration
    after = instance_row(home, victim_id)
    for field in ("sealing_public_key", "key_spki", "cert_serial", "machine_fingerprint"):
        assert after[field] == before[field], field
    assert [c["serial"] for c in valid_certs(home, victim_id)] == [before["cert_serial"]]
    assert len(home.status()["instances"]) == 1
    home.set_config({**CONFIG, "agent": {"note": "v2"}})
    victim.wait_log("configuration v2 applied")
    assert victim.alive()

    # the attempt is visible to the operator: status (JSON and text) and an audit event
    status = home.status()
    (clone,) = [c for c in status["clones"] if c["machine_fingerprint"] == victim.fingerprint]
    assert clone["reason"] == "machine_enrolled" and clone["instance_id"] == victim_id
    text = home.cli("status").stdout
    assert victim.fingerprint in text and "machine_enrolled" in text
    events = [line for line in home.log_text().splitlines()
              if "clone_refused" in line and victim.fingerprint in line]
    assert events and "reason=machine_enrolled" in events[0], home.log_text()[-2000:]


def _expired_cert(home, state, instance_id: str):
    """A certificate for the agent's own key, from home's CA, already expired."""
    ca_key = pki.load_key_pem((home.state / "ca.key").read_bytes())
    ca_cert = pki.load_cert_pem((home.state / "ca.crt").read_bytes())
    keys, _ = instancekeys.load_or_create_keys(state)
    csr = pki.load_csr(instancekeys.make_csr(keys, instance_id))
    return pki.issue_instance(ca_key, ca_cert, csr, instance_id, home.connector,
                              hours=-0.01).cert  # not_after 36 s ago


def test_agent_whose_certificate_expired_while_home_was_away_re_enrols(home_factory,
                                                                       agent_factory, waiter):
    home = home_factory(max_instances=1)
    agent = agent_factory(home.issue_image())
    agent.wait_log("socket 1 connected")
    (row,) = home.status()["instances"]
    agent.stop()
    home.stop()
    instancekeys.store_cert(agent.state, _expired_cert(home, agent.state, row["instance_id"]))
    home.serve()
    agent.start()
    agent.wait_log("enrolled as instance", count=2)
    agent.wait_log("socket 1 connected", count=2)
    (again,) = home.status()["instances"]
    assert again["instance_id"] == row["instance_id"]
    assert home.status()["clones"] == []
    # the re-enrolment replaced the old certificate: one valid certificate left
    valid = valid_certs(home, row["instance_id"])
    assert [c["serial"] for c in valid] == [again["cert_serial"]]


def test_appliance_that_lost_its_state_needs_instance_reset(home_factory, agent_factory, waiter):
    home = home_factory(max_instances=1)
    agent = agent_factory(home.issue_image())
    agent.wait_log("socket 1 connected")
    home.set_config(CONFIG)
    agent.wait_log("configuration v1 applied")
    (row,) = home.status()["instances"]
    agent.stop()
    for path in sorted(agent.state.rglob("*"), reverse=True):  # the data disk is gone
        path.unlink() if path.is_file() else path.rmdir()

    agent.start()
    text = agent.wait_log("enrollment failed")
    assert "clone_refused" in text
    assert f"tether-home instance reset {row['instance_id']}" in text
    assert not (agent.state / "instance.crt").exists()

    reset = home.cli("instance", "reset", row["instance_id"])
    assert row["instance_id"] in reset.stdout and "revoked 1 certificate(s)" in reset.stdout
    # the log file is appended across restarts: the first boot's lines count once
    agent.wait_log("enrolled as instance", count=2, timeout=120)
    agent.wait_log("configuration v1 applied", count=2, timeout=60)  # sealed to its new key
    (again,) = home.status()["instances"]
    assert again["instance_id"] == row["instance_id"]
    assert [c["serial"] for c in valid_certs(home, row["instance_id"])] == \
        [again["cert_serial"]]  # the certificate of the lost state stays revoked
