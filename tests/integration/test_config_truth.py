"""Home is the source of truth for configuration (issue 11, points 4 and 5).

From the operator's and the attacker's side against real processes: an agent
that lost its configuration gets it pushed again on every restart (no race
between hello and ``config.ack``), and an agent (or a forged state directory)
that reports a version home never signed for it does not stop home's pushes.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from homeproc import RawAgent, client_context, enroll
from tether import configsig
from tether import protocol as p

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CONFIG = {"directories": [], "agent": {"note": "v1"}}


def instance_row(home):
    rows = home.status()["instances"]
    return rows[0] if rows else None


def test_lost_configuration_is_pushed_again_on_every_restart(home_factory, agent_factory,
                                                             waiter):
    """Point 4: stop the agent, delete config.json, start it: home pushes again, 10 of 10."""
    home = home_factory()
    agent = agent_factory(home.issue_image())
    agent.wait_log("socket 1 connected")
    home.set_config(CONFIG)
    agent.wait_log("configuration v1 applied")
    waiter(lambda: (r := instance_row(home)) and r["config_status"] == "applied", 15,
           what="v1 applied in status")
    for attempt in range(2, 12):
        agent.stop()
        (agent.state / "config.json").unlink()
        agent.start()
        agent.wait_log("configuration v1 applied", count=attempt, timeout=30)
        assert (agent.state / "config.json").exists()
    assert "Traceback" not in home.log_text()


def _answer_push(agent: RawAgent, push, applied: bool = True) -> dict:
    """Answer a config.push as a well-behaved agent (queued; flush to send)."""
    document = push.message.body["config"]
    version = document["payload"]["version"]
    agent.session.respond(push.message, {"version": version, "applied": applied})
    agent.session.event(p.Op.CONFIG_ACK, {"version": version, "status": "applied"})
    return document


async def _next_push(agent: RawAgent, timeout: float = 15.0):
    """The next config.push home sends (other events are kept in the inbox)."""
    while True:
        for i, ev in enumerate(agent.inbox):
            if getattr(ev, "message", None) is not None and ev.message.op is p.Op.CONFIG_PUSH:
                return agent.inbox.pop(i)
        agent.inbox.extend(await agent.next_events(timeout))


def test_ack_claiming_a_version_home_never_signed_is_told_and_repushed(home_factory, tmp_path):
    """Point 5: a config.ack (or hello) claiming v999 must not stop home's pushes."""
    home = home_factory()
    bundle = home.issue_image()
    home.set_config(CONFIG)
    instance_id, cert_pem, key_pem, _ = asyncio.run(enroll(home, bundle, tmp_path, "vm-x"))
    ctx = client_context(bundle["ca_pem"], cert_pem, key_pem, tmp_path)

    async def go():
        agent = await RawAgent.connect(home.url, ctx)
        await agent.hello(bundle["image_id"], instance_id, fingerprint="vm-x")
        _answer_push(agent, await _next_push(agent))  # v1 confirmed
        await agent.flush()
        # the attack: claim a version home never signed
        agent.session.event(p.Op.CONFIG_ACK, {"version": 999, "status": "applied"})
        await agent.flush()
        told = await _next_push(agent)
        agent.session.fail(told.message, p.ErrorCode.STALE_CONFIG, "ignoring you")
        await agent.flush()
        await agent.close()
        # a new socket that says v999 in its hello is told the same
        agent = await RawAgent.connect(home.url, ctx)
        await agent.hello(bundle["image_id"], instance_id, fingerprint="vm-x",
                          config_version=999)
        again = await _next_push(agent)
        _answer_push(agent, again)
        await agent.flush()
        # and the next configuration still reaches the instance
        setter = asyncio.create_task(asyncio.to_thread(home.set_config, {"agent": {"v": 2}}))
        newer = await _next_push(agent)
        _answer_push(agent, newer)
        await agent.flush()
        out = await setter
        await agent.close()
        return told, again, newer, out

    told, again, newer, out = asyncio.run(go())
    for push in (told, again):
        assert push.message.body["replace"] is True
        assert "never signed" in push.message.body["reason"]
        assert push.message.body["config"]["payload"]["version"] == 1
    assert "replace" not in newer.message.body
    assert newer.message.body["config"]["payload"]["version"] == 2
    assert "pushed to 1 connected instance" in out
    row = next(r for r in home.status()["instances"] if r["instance_id"] == instance_id)
    assert row["config_confirmed"] == 2
    assert home.log_text().count("config_version_unknown") >= 2
    assert "Traceback" not in home.log_text()


def test_self_signed_high_version_in_state_dir_is_replaced(home_factory, agent_factory):
    """Point 5: a state directory holding a document signed by its own key at v999
    (and that key planted as config-key.pem) loses against home's v1."""
    home = home_factory()
    agent = agent_factory(home.issue_image())
    agent.wait_log("socket 1 connected")
    home.set_config(CONFIG)
    agent.wait_log("configuration v1 applied")
    agent.stop()
    instance_id = json.loads((agent.state / "instance.json").read_text())["instance_id"]
    rogue = configsig.generate_signing_key()
    forged = configsig.sign_config(rogue, {"agent": {"note": "planted"}}, version=999,
                                   connector=home.connector, instance_id=instance_id)
    (agent.state / "config-key.pem").write_bytes(configsig.public_key_pem(rogue))
    (agent.state / "config.json").write_text(json.dumps(forged))
    agent.start()
    agent.wait_log("running from last good configuration v999")  # the plant worked locally
    agent.wait_log("configuration v1 applied", count=2, timeout=30)
    on_disk = json.loads((agent.state / "config.json").read_text())
    assert on_disk["payload"]["version"] == 1
    assert on_disk["key_id"] != configsig.key_id(rogue.public_key())
    assert "home replaces configuration v999" in agent.log() or \
        "was not signed by home's key" in agent.log()


def test_directory_state_is_owner_only(home_factory, agent_factory):
    """Point 9: spools and cursors (user records) under state/directories/ are 0700,
    also when an older agent left the directory at 0755."""
    home = home_factory()
    agent = agent_factory(home.issue_image(), start=False)
    (agent.state / "directories").mkdir(parents=True, mode=0o755)
    (agent.state / "directories").chmod(0o755)
    agent.start()
    agent.wait_log("socket 1 connected")
    home.set_config({"directories": [{
        "id": "corp", "kind": "openldap", "servers": ["127.0.0.1:1"], "tls": "plain",
        "allow_plain": True, "bind_dn": "cn=tether,dc=example", "bind_password": "pw",
        "base_dns": ["dc=example"]}]})
    agent.wait_log("configuration v1 applied")
    root = agent.state / "directories"
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
