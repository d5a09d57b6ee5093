"""Whole-image updates between a real home and a real agent process (issue 14).

Real RAUC checks bundles at publish; the agent downloads the bundle over its own
TLS socket to home in bounded pieces, checks size and SHA256, then runs the real
`rauc install`, which on this build host (no RAUC service, no A/B slots) fails:
the agent must report that as `failed`, with rauc's reason, and leave nothing
installed or pending. The A/B install itself runs under qemu (tests/e2e).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tether.home import admin, paths, updatekeys
from tether.image import bundle

pytestmark = pytest.mark.skipif(not (shutil.which("rauc") and shutil.which("mksquashfs")),
                                reason="rauc and squashfs-tools are needed (deps/apt-packages.txt)")

RUNNING = "0.1.0.20260101000000"
NEWER = "0.1.0.20260202000000"


def _make_bundle(tmp: Path, keys: updatekeys.UpdateKeys, version: str, size: int = 3 * 1024 * 1024) -> Path:
    root = tmp / f"root-{version}"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=debian\n")
    # incompressible: the bundle spans several update.fetch pieces
    (root / "blob").write_bytes(os.urandom(size))
    tar = tmp / f"rootfs-{version}.tar"
    bundle.rootfs_tar(root, tar)
    out = tmp / f"tether-{version}.raucb"
    bundle.create(tar, out, version, keys.signing_cert, keys.signing_key)
    return out


def _status(home) -> dict:
    return json.loads(home.cli("update", "status", "--json").stdout)


def _wait_state(home, instance: str | None, version: str, states: tuple[str, ...], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    rows: list = []
    while time.monotonic() < deadline:
        rows = [r for r in _status(home)["progress"] if r["version"] == version
                and (instance is None or r["instance_id"] == instance)]
        if rows and rows[-1]["state"] in states:
            return rows[-1]
        time.sleep(0.3)
    raise AssertionError(f"no update state in {states} for {version}: {rows}")


def _agent(agent_factory, tmp_path, credential, version: str, slot: str = "A"):
    cmdline = tmp_path / f"cmdline-{slot}-{version}"
    cmdline.write_text(f"root=PARTLABEL=root-{slot.lower()} rauc.slot={slot} panic=10\n")
    version_file = tmp_path / f"image-version-{version}"
    version_file.write_text(version + "\n")
    return agent_factory(credential, args=["--cmdline", str(cmdline), "--image-version-file", str(version_file)])


@pytest.fixture
def home(home_factory):
    return home_factory()


def test_publish_rollout_download_and_install_failure_is_reported(home, agent_factory, tmp_path):
    keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
    raucb = _make_bundle(tmp_path, keys, NEWER)
    out = home.cli("update", "publish", str(raucb)).stdout
    assert f"published {NEWER}" in out

    credential = home.issue_image()
    agent = _agent(agent_factory, tmp_path, credential, RUNNING)
    deadline = time.monotonic() + 60
    while not _status(home)["running"] and time.monotonic() < deadline:
        time.sleep(0.3)
    running = _status(home)["running"]
    assert running and running[0]["image_version"] == RUNNING and running[0]["boot_slot"] == "A"
    instance = running[0]["instance_id"]

    out = home.cli("update", "rollout", NEWER, "--connector", home.connector).stdout
    assert "offered now to 1 instance(s)" in out
    row = _wait_state(home, instance, NEWER, ("failed", "installed", "rebooting"), timeout=120)
    # the whole bundle came over the channel and matched its SHA256: only rauc install failed
    assert row["state"] == "failed", row
    assert "rauc install failed" in row["detail"], row
    update_dir = agent.state / "update"
    assert not list(update_dir.glob("*.raucb*")), "the bundle is deleted after a failed install"
    assert not (update_dir / "pending.json").exists() and not (update_dir / "reboot").exists()
    assert "update_state" in home.log_text()
    text = home.cli("update", "status").stdout
    assert f"{NEWER} failed" in text and "rauc install failed" in text


def test_an_offer_not_newer_than_the_running_version_is_refused(home, agent_factory, tmp_path):
    keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
    raucb = _make_bundle(tmp_path, keys, RUNNING, size=1024)
    home.cli("update", "publish", str(raucb))
    credential = home.issue_image()
    _agent(agent_factory, tmp_path, credential, NEWER)
    deadline = time.monotonic() + 60
    while not _status(home)["running"] and time.monotonic() < deadline:
        time.sleep(0.3)
    home.cli("update", "rollout", RUNNING, "--connector", home.connector)
    # home itself never offers a version that is not newer: nothing is offered at all
    time.sleep(1)
    assert [r for r in _status(home)["progress"] if r["version"] == RUNNING] == []


def test_publish_refuses_foreign_tampered_and_missing_bundles_in_one_sentence(home, tmp_path):
    other = paths.StatePaths(tmp_path / "other-home")
    admin.init(other, [])
    foreign = _make_bundle(tmp_path, updatekeys.UpdateKeys.of(other), NEWER, size=1024)
    res = home.cli("update", "publish", str(foreign), check=False)
    assert res.returncode == 2 and "refused" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

    keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
    good = _make_bundle(tmp_path, keys, "0.1.0.20260303000000", size=64 * 1024)
    tampered = tmp_path / "tampered.raucb"
    data = bytearray(good.read_bytes())
    data[100] ^= 0xFF
    tampered.write_bytes(bytes(data))
    res = home.cli("update", "publish", str(tampered), check=False)
    assert res.returncode == 2 and "refused" in res.stderr and "Traceback" not in res.stderr

    res = home.cli("update", "publish", str(tmp_path / "nope.raucb"), check=False)
    assert res.returncode == 2 and "not found" in res.stderr

    res = home.cli("update", "rollout", "9.9", "--connector", home.connector, check=False)
    assert res.returncode == 2 and "publish" in res.stderr and "Traceback" not in res.stderr


def test_pause_resume_abort(home, tmp_path):
    keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
    home.cli("update", "publish", str(_make_bundle(tmp_path, keys, NEWER, size=1024)))
    res = home.cli("update", "pause", "--connector", home.connector, check=False)
    assert res.returncode == 2 and "has no rollout" in res.stderr
    assert "active" in home.cli("update", "rollout", NEWER, "--connector", home.connector).stdout
    assert ": paused" in home.cli("update", "pause", "--connector", home.connector).stdout
    assert ": active" in home.cli("update", "resume", "--connector", home.connector).stdout
    assert ": aborted" in home.cli("update", "abort", "--connector", home.connector).stdout
    assert _status(home)["rollouts"][-1]["status"] == "aborted"
    res = home.cli("update", "rollout", NEWER, "--connector", "nobody", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
