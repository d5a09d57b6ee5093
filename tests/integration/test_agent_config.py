"""Signed configuration on a real agent process: push from a real home, secrets
sealed on disk, tampered documents refused with the last good one kept, a
tampered last-good file refused at start.

The tampered push needs a peer that sends one: the real home never does, so a
``scripted_home`` (conftest) takes home's place on its port with home's own
server certificate (a stolen-key / compromised-relay scenario) and speaks the
real protocol (:class:`tether.protocol.Session`) to the unmodified agent process.
"""

from __future__ import annotations

import copy
import json

import pytest

from tether import configsig

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CONFIG = {"directories": [{"name": "corp-ad", "bind_password": "Bind-Pa55!"}],
          "agent": {"note": "v1"}}


def instance_row(home):
    rows = home.status()["instances"]
    return rows[0] if rows else None


def test_push_applies_and_secrets_stay_sealed_on_disk(home_factory, agent_factory, waiter):
    home = home_factory()
    agent = agent_factory(home.issue_image())
    agent.wait_log("socket 1 connected")
    home.set_config(CONFIG)
    agent.wait_log("configuration v1 applied")
    on_disk = (agent.state / "config.json").read_text()
    assert "Bind-Pa55!" not in on_disk and "tether-sealed:v1:" in on_disk
    assert oct((agent.state / "config.json").stat().st_mode & 0o777) == "0o600"
    row = waiter(lambda: (r := instance_row(home)) and r["config_status"] == "applied" and r,
                 15, what="config applied in status")
    assert row["config_version"] == 1


def test_tampered_push_refused_last_good_kept(home_factory, agent_factory, waiter,
                                              scripted_home):
    home = home_factory()
    agent = agent_factory(home.issue_image())
    agent.wait_log("socket 1 connected")
    home.set_config(CONFIG)
    agent.wait_log("configuration v1 applied")
    good = (agent.state / "config.json").read_bytes()

    altered = json.loads(good)  # home's v1, edited after signing
    altered["payload"]["version"] = 2
    altered["payload"]["config"]["agent"]["note"] = "evil"
    rogue = configsig.sign_config(configsig.generate_signing_key(), {"agent": {}},
                                  version=3, connector=home.connector)
    home.stop()
    with scripted_home(home, pushes=[altered, rogue]) as hostile:
        waiter(lambda: len(hostile.answers) >= 2, 75, what="the agent's answers to both pushes")
    assert [a["kind"] for a in hostile.answers] == ["error", "error"]
    assert {a["code"] for a in hostile.answers} == {"bad_signature"}
    acks = [e.body for e in hostile.events if e.op.value == "config.ack"]
    assert any(a["status"] == "rejected" and a["error"] == "bad_signature" for a in acks)
    assert agent.alive()
    assert (agent.state / "config.json").read_bytes() == good  # last good kept
    assert agent.log().count("configuration refused") >= 2

    home.serve()  # the real home again: the agent runs v1 and says so
    row = waiter(lambda: (r := instance_row(home)) and r["connected_sockets"] == 2 and r, 75,
                 what="agent back at the real home")
    assert row["config_version"] == 1


def test_tampered_last_good_file_refused_at_start(home_factory, agent_factory, waiter):
    home = home_factory()
    agent = agent_factory(home.issue_image())
    agent.wait_log("socket 1 connected")
    home.set_config(CONFIG)
    agent.wait_log("configuration v1 applied")
    agent.stop()
    path = agent.state / "config.json"
    document = json.loads(path.read_text())
    edited = copy.deepcopy(document)
    edited["payload"]["config"]["agent"]["note"] = "edited on disk"
    path.write_text(json.dumps(edited))

    home.stop()  # home away: the agent must not run from the edited file
    agent.start()
    text = agent.wait_log("last good configuration").split("tether-agent starting")[-1]
    assert "refused" in text and "signature does not verify" in text
    assert "running from last good configuration" not in text

    home.serve()  # home back: it pushes v1 again, properly signed
    agent.wait_log("configuration v1 applied", count=2, timeout=75)
    fresh = json.loads(path.read_text())  # re-sealed and re-signed, same content
    assert fresh["payload"]["version"] == document["payload"]["version"] == 1
    assert fresh["payload"]["config"]["agent"] == {"note": "v1"}
