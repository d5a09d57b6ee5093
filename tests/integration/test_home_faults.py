"""Faults of home's own state and of its admin channel, from the operator's side
(issue 11, points 7, 8 and 9): a full disk, damaged files, a control socket that is
abused or loses its server mid-call. Real ``tether-home`` processes throughout.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from homeproc import TETHER_HOME, HomeProcess, RawAgent, client_context, enroll
from tether import protocol as p

pytestmark = [pytest.mark.timeout(240)]


def _cli(state: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([TETHER_HOME, *args, "--state", str(state)], capture_output=True,
                          text=True, timeout=timeout)


def _one_sentence(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with one line on stderr naming the needles, no traceback."""
    assert result.returncode != 0, result
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tether-home "), text
    for needle in needles:
        assert needle in last, last
    return last


def _serve_once(state: Path) -> subprocess.CompletedProcess:
    return _cli(state, "serve", "--listen", "127.0.0.1:0", timeout=60)


@pytest.fixture
def stopped_home(tmp_path):
    """An initialized state directory with one connector, an image and a synced identity
    database, home stopped."""
    home = HomeProcess.start(tmp_path / "h")
    home.issue_image()
    home.stop()
    assert (home.state / "identity.db").exists()
    yield home
    home.stop()  # a test that served it again must not leave home running


# ------------------------------------------------------------- corrupt state (point 8)


@pytest.mark.parametrize("name", ["home.sqlite3", "identity.db"])
def test_garbage_database_is_refused_in_one_sentence(stopped_home, name):
    path = stopped_home.state / name
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.write_bytes(b"this is not SQLite at all\n" * 200)
    _one_sentence(_serve_once(stopped_home.state), name, "restore")
    _one_sentence(_cli(stopped_home.state, "status"), name, "restore")


@pytest.mark.parametrize("name", ["home.sqlite3", "identity.db"])
def test_truncated_database_is_refused_never_recreated(stopped_home, name):
    path = stopped_home.state / name
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.write_bytes(b"")
    _one_sentence(_serve_once(stopped_home.state), name, "truncated")
    _one_sentence(_cli(stopped_home.state, "status"), name, "truncated")
    assert path.stat().st_size == 0  # not silently made anew


def test_damaged_page_is_found_at_start(stopped_home):
    path = stopped_home.state / "home.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) >= 4 * page
    for start in range(page, len(data), page):  # every page but the header page
        data[start:start + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))
    _one_sentence(_serve_once(stopped_home.state), "home.sqlite3", "restore")


def test_garbage_server_key_is_one_sentence(stopped_home):
    (stopped_home.state / "server.key").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n")
    _one_sentence(_serve_once(stopped_home.state), "server.key", "server-cert")
    # the hint works: a new server key and certificate, and home serves again
    assert _cli(stopped_home.state, "server-cert").returncode == 0
    stopped_home.serve()
    assert stopped_home.live()


# -------------------------------------------------------- control socket (point 9)


def test_control_socket_limits_and_true_messages(tmp_path):
    with HomeProcess.start(tmp_path / "h") as home:
        sock_path = str(home.state / "control.sock")
        # an idle connection is closed by home
        with socket.socket(socket.AF_UNIX) as idle:
            idle.connect(sock_path)
            idle.settimeout(20)
            assert idle.recv(100) == b""
        # a request over 64 KiB gets an answer that says so
        with socket.socket(socket.AF_UNIX) as big:
            big.connect(sock_path)
            big.settimeout(20)
            big.sendall(b'{"cmd": "live", "pad": "' + b"x" * 80_000 + b'"}\n')
            reply = json.loads(big.makefile("rb").readline())
        assert reply["ok"] is False and "64 KiB" in reply["error"]
        # the CLI's own oversized request: a true sentence, not "home is not running"
        order = tmp_path / "order.json"
        order.write_text(json.dumps({"id": "o1", "op": "create_user", "pad": "x" * 80_000}))
        out = _one_sentence(_cli(home.state, "provision", "--directory", "d",
                                 "--order", str(order)), "64 KiB")
        assert "not running" not in out
        assert home.live()


def test_config_set_with_a_silent_appliance_and_home_killed_mid_call(tmp_path):
    with HomeProcess.start(tmp_path / "h") as home:
        bundle = home.issue_image()
        instance_id, cert_pem, key_pem, _ = asyncio.run(enroll(home, bundle, tmp_path, "vm"))
        ctx = client_context(bundle["ca_pem"], cert_pem, key_pem, tmp_path)
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"agent": {"note": "x"}}))

        async def silent_agent(action):
            agent = await RawAgent.connect(home.url, ctx)
            await agent.hello(bundle["image_id"], instance_id, fingerprint="vm")
            try:
                return await action()
            finally:
                await agent.close()

        # the appliance never answers the push: config set reports it, well within 30 s
        result = asyncio.run(silent_agent(lambda: asyncio.to_thread(
            _cli, home.state, "config", "set", "acme", str(config))))
        assert result.returncode == 0, result.stderr
        assert f"no answer from {instance_id}" in result.stdout
        assert "Traceback" not in result.stdout + result.stderr

        # home killed while config set waits for the push: a true sentence
        async def kill_mid_call():
            proc = await asyncio.create_subprocess_exec(
                TETHER_HOME, "config", "set", "acme", str(config), "--state", str(home.state),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            for _ in range(100):
                if "config-changed" in home.log_text() or "config_push" in home.log_text():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            home.kill()
            out, err = await proc.communicate()
            return proc.returncode, out.decode(), err.decode()
        code, out, err = asyncio.run(silent_agent(kill_mid_call))
        assert code != 0 and "Traceback" not in out + err
        assert "not running" not in err and "without answering" in err
        assert "is stored" in err


# ----------------------------------------------------------- disk full (point 7)


@pytest.fixture
def tiny_state(tmp_path):
    """Home's state directory on a 3 MiB tmpfs (unmounted at teardown)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    root = tmp_path / "h"
    state = root / "home-state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(state)],
                   check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def test_disk_full_does_not_lock_out_reconnecting_agents(tiny_state, agent_factory):
    home = HomeProcess.start(tiny_state)
    try:
        agent = agent_factory(home.issue_image())
        agent.wait_log("socket 1 connected")
        home.set_config({"agent": {"note": "v1"}})
        agent.wait_log("configuration v1 applied")
        agent.stop()
        filler = _fill(home.state)
        agent.start()  # reconnects to a home whose disk is full
        agent.wait_log("socket 1 connected", count=2, timeout=60)
        time.sleep(2 * 5.5)  # two heartbeat flushes on the full disk
        assert agent.alive() and "HelloRefused" not in agent.log()
        log = home.log_text()
        assert "Traceback" not in log, log[-3000:]
        assert log.count("bookkeeping_suspended") == 1
        # the CLI on a full disk: one sentence
        config = tiny_state / "c.json"
        config.write_text(json.dumps({"agent": {"note": "v2"}}))
        _one_sentence(_cli(home.state, "config", "set", "acme", str(config)), "free space")
        # space again: bookkeeping resumes, the agent is seen
        filler.unlink()
        home.set_config({"agent": {"note": "v2"}})
        agent.wait_log("configuration v2 applied", timeout=30)
        deadline = time.monotonic() + 40
        while "bookkeeping_resumed" not in home.log_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "bookkeeping_resumed" in home.log_text()
        row = home.status()["instances"][0]
        assert row["connected_sockets"] == 2 and row["config_confirmed"] == 2
    finally:
        home.stop()
