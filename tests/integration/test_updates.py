"""Whole-image updates between a real home and real agent processes (issue 14).

Real RAUC checks bundles at publish; the agent downloads the bundle over its own
TLS socket to home in bounded pieces, checks size and SHA256, then runs the real
`rauc install`, which on this build host (no RAUC service, no A/B slots) fails:
the agent must report that as `failed`, with rauc's reason, and leave nothing
installed or pending. The A/B install itself runs under qemu (tests/e2e).

The rollout rules (canary, one instance per cluster, no second offer after a
rollback) and the download's bad cases need installs that succeed: there the
agents get a logging stand-in for rauc (homeproc.fake_rauc) and a "reboot" is
the agent process started again with another kernel command line (rauc.slot=)
and image version, on the same state directory, as GRUB would boot it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from homeproc import fake_rauc, rauc_calls, sha256_of

from tether.home import admin, paths, updatekeys
from tether.image import bundle

pytestmark = pytest.mark.skipif(not (shutil.which("rauc") and shutil.which("mksquashfs")),
                                reason="rauc and squashfs-tools are needed (deps/apt-packages.txt)")

RUNNING = "0.1.0.20260101000000"
NEWER = "0.1.0.20260202000000"


def _make_bundle(tmp: Path, keys: updatekeys.UpdateKeys, version: str, size: int = 3 * 1024 * 1024,
                 compatible: str = bundle.COMPATIBLE) -> Path:
    root = tmp / f"root-{version}"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=debian\n")
    # incompressible: the bundle spans several update.fetch pieces
    (root / "blob").write_bytes(os.urandom(size))
    tar = tmp / f"rootfs-{version}.tar"
    bundle.rootfs_tar(root, tar)
    out = tmp / f"tether-{version}.raucb"
    bundle.create(tar, out, version, keys.signing_cert, keys.signing_key, compatible=compatible)
    tar.unlink()
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

    truncated = tmp_path / "truncated.raucb"
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    res = home.cli("update", "publish", str(truncated), check=False)
    assert res.returncode == 2 and "refused" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

    other_product = _make_bundle(tmp_path, keys, "0.1.0.20260404000000", size=1024,
                                 compatible="someone-else-amd64")
    res = home.cli("update", "publish", str(other_product), check=False)
    assert res.returncode == 2 and "someone-else-amd64" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert _status(home)["bundles"] == [], "nothing refused is kept"

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


# ------------------------------------------------------------------ appliances with a fake rauc

class Appliance:
    """A real agent process that believes it booted from an A/B slot, with a logging rauc.

    :meth:`reboot` is what GRUB and the appliance's reboot would do: the process
    stops and starts again on the same state directory (the appliance's /data)
    with the booted slot and that slot's image version.
    """

    def __init__(self, agent_factory, tmp: Path, credential: dict, name: str, version: str,
                 slot: str = "A", firstboot: dict | None = None, install_fails: str | None = None) -> None:
        self.dir = tmp / f"boot-{name}"
        self.dir.mkdir(parents=True)
        self.rauc = fake_rauc(self.dir / "rauc", install_fails)
        self.cmdline = self.dir / "cmdline"
        self.version_file = self.dir / "image-version"
        self._boot(slot, version)
        self.agent = agent_factory(credential, name=name, firstboot=firstboot, args=[
            "--cmdline", str(self.cmdline), "--image-version-file", str(self.version_file),
            "--rauc", str(self.rauc)])

    def _boot(self, slot: str, version: str) -> None:
        self.slot, self.version = slot, version
        self.cmdline.write_text(f"root=PARTLABEL=root-{slot.lower()} rauc.slot={slot} panic=10\n")
        self.version_file.write_text(version + "\n")

    @property
    def update_dir(self) -> Path:
        return self.agent.state / "update"

    def instance_id(self, timeout: float = 60.0) -> str:
        path = self.agent.state / "instance.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return json.loads(path.read_text())["instance_id"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.2)
        raise AssertionError(f"{self.agent.root.name} did not enroll:\n{self.agent.log()[-3000:]}")

    def wait_reboot_request(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.update_dir / "reboot").exists():
            assert time.monotonic() < deadline, f"no reboot request:\n{self.agent.log()[-3000:]}"
            time.sleep(0.2)

    def reboot(self, slot: str, version: str) -> None:
        """Stop; GRUB boots ``slot`` holding ``version``; start (tether-reboot.path consumed the request)."""
        self.agent.stop()
        (self.update_dir / "reboot").unlink(missing_ok=True)
        self._boot(slot, version)
        self.agent.start()

    def installs(self) -> list[dict]:
        return [c for c in rauc_calls(self.rauc) if c["args"][:1] == ["install"]]

    def offers(self) -> int:
        """Offers this agent took (a repeat of one under way does not count)."""
        return self.agent.log().count(" offered (")


def _progress(home, version: str) -> dict[str, dict]:
    return {r["instance_id"]: r for r in _status(home)["progress"] if r["version"] == version}


def _wait_running(home, instances: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(instances) <= {r["instance_id"] for r in _status(home)["running"]}:
            return
        time.sleep(0.3)
    raise AssertionError(f"not all of {instances} said hello: {_status(home)['running']}")


def _updating(progress: dict[str, dict], instances) -> list[str]:
    return [i for i in instances if progress.get(i, {}).get("state") in
            ("offered", "downloading", "installed", "rebooting")]


def test_one_instance_per_cluster_and_canary_across_connectors(home_factory, agent_factory, tmp_path):
    """Cluster dir1 = connectors acme (2 instances, canary 1) and beta (1 instance);
    connector solo is cluster dir2. Never two instances of dir1 updating at once,
    dir2 updates alongside; acme's second instance only after its canary committed."""
    home = home_factory(connector="acme", max_instances=2, cluster="dir1")
    home.cli("connector", "create", "beta", "--max-instances", "1", "--cluster", "dir1")
    home.cli("connector", "create", "solo", "--max-instances", "1", "--cluster", "dir2")
    keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
    home.cli("update", "publish", str(_make_bundle(tmp_path, keys, NEWER, size=256 * 1024)))

    boxes = {}
    for name, connector in (("a1", "acme"), ("a2", "acme"), ("b1", "beta"), ("s1", "solo")):
        boxes[name] = Appliance(agent_factory, tmp_path, home.issue_image(connector=connector), name, RUNNING)
    ids = {name: box.instance_id() for name, box in boxes.items()}
    _wait_running(home, list(ids.values()))
    canary, rest = sorted([ids["a1"], ids["a2"]])
    by_id = {iid: boxes[name] for name, iid in ids.items()}
    dir1 = [ids["a1"], ids["a2"], ids["b1"]]

    home.cli("update", "rollout", NEWER, "--connector", "acme", "--canary", "1")
    home.cli("update", "rollout", NEWER, "--connector", "beta")
    home.cli("update", "rollout", NEWER, "--connector", "solo")
    # dir2 does not wait for dir1
    _wait_state(home, ids["s1"], NEWER, ("rebooting",))
    committed: list[str] = []
    while len(committed) < len(dir1):
        deadline = time.monotonic() + 60
        while True:
            progress = _progress(home, NEWER)
            updating = _updating(progress, dir1)
            assert len(updating) <= 1, f"two instances of cluster dir1 updating at once: {progress}"
            if updating and progress[updating[0]]["state"] == "rebooting":
                break
            assert time.monotonic() < deadline, f"nobody in dir1 reached rebooting: {progress}"
            time.sleep(0.2)
        iid = updating[0]
        # acme's non-canary instance waits for the canary to commit
        if iid == rest:
            assert canary in committed, f"{rest} offered before the canary {canary} committed"
        box = by_id[iid]
        box.wait_reboot_request()
        assert box.installs() and box.installs()[-1]["sha256"] == _status(home)["bundles"][0]["sha256"]
        # still nobody else of dir1 while this one is rebooting
        time.sleep(1)
        assert _updating(_progress(home, NEWER), dir1) == [iid]
        box.reboot("B", NEWER)
        row = _wait_state(home, iid, NEWER, ("committed", "failed", "rolled_back"))
        assert row["state"] == "committed" and row["slot"] == "B", row
        committed.append(iid)
    assert canary in committed[:2], committed  # beta may go first: it has no canary
    assert all(box.offers() == 1 for box in boxes.values()), {n: b.offers() for n, b in boxes.items()}
    running = {r["instance_id"]: r for r in _status(home)["running"]}
    assert all(running[i]["image_version"] == NEWER and running[i]["boot_slot"] == "B" for i in dir1)


def test_canary_rollback_stops_the_rollout_and_the_version_is_never_offered_there_again(
        home_factory, agent_factory, tmp_path):
    """Three instances; the first by id already runs the version, so the canary is the
    second; it rolls back: nothing more is offered. A new rollout without a canary
    updates the third, never the one where the version rolled back."""
    home = home_factory(connector="acme", max_instances=3)
    keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
    home.cli("update", "publish", str(_make_bundle(tmp_path, keys, NEWER, size=256 * 1024)))
    boxes = [Appliance(agent_factory, tmp_path, home.issue_image(), f"n{i}", RUNNING) for i in range(3)]
    by_id = {box.instance_id(): box for box in boxes}
    first, canary, last = sorted(by_id)
    by_id[first].reboot("A", NEWER)  # this one runs the rollout's version already
    deadline = time.monotonic() + 60
    while {r["instance_id"]: r["image_version"] for r in _status(home)["running"]}.get(first) != NEWER:
        assert time.monotonic() < deadline, _status(home)["running"]
        time.sleep(0.3)
    _wait_running(home, [canary, last])

    out = home.cli("update", "rollout", NEWER, "--connector", "acme", "--canary", "1").stdout
    assert "offered now to 1 instance(s)" in out, out
    _wait_state(home, canary, NEWER, ("rebooting",))
    assert set(_progress(home, NEWER)) == {canary}
    by_id[canary].wait_reboot_request()
    # GRUB fell back: the appliance boots slot A with the old version again
    by_id[canary].reboot("A", RUNNING)
    row = _wait_state(home, canary, NEWER, ("rolled_back", "committed"))
    assert row["state"] == "rolled_back" and "never became healthy" in row["detail"], row
    assert any(c["args"] == ["status", "mark-bad", "other"] for c in rauc_calls(by_id[canary].rauc))
    # the canary rolled back: the rollout stops, the third instance is not offered it
    time.sleep(2)
    assert set(_progress(home, NEWER)) == {canary}, _progress(home, NEWER)
    assert by_id[last].offers() == 0

    # the operator goes on without a canary: the third gets it, the canary never again
    by_id[canary].reboot("A", RUNNING)  # and a hello of the rolled-back instance offers nothing
    out = home.cli("update", "rollout", NEWER, "--connector", "acme").stdout
    assert "offered now to 1 instance(s)" in out, out
    _wait_state(home, last, NEWER, ("rebooting",))
    by_id[last].wait_reboot_request()
    by_id[last].reboot("B", NEWER)
    assert _wait_state(home, last, NEWER, ("committed", "rolled_back", "failed"))["state"] == "committed"
    time.sleep(1)
    assert _progress(home, NEWER)[canary]["state"] == "rolled_back"
    assert by_id[canary].offers() == 1 and len(by_id[canary].installs()) == 1
    assert by_id[first].offers() == 0


# ------------------------------------------------------------------ bad input on the way to the slot

BIG = 48 * 1024 * 1024  # about a hundred update.fetch pieces: time to interrupt the download


def _wait_part(box: Appliance, version: str, timeout: float = 60.0) -> int:
    """Bytes of the partial download, once some are on disk and more are to come."""
    part = box.update_dir / f"{version}.raucb.part"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            size = part.stat().st_size
        except OSError:
            size = 0
        if size > 0:
            return size
        time.sleep(0.005)
    raise AssertionError(f"no partial download of {version}:\n{box.agent.log()[-3000:]}")


def _one_appliance(home, agent_factory, tmp_path, **kwargs) -> tuple[Appliance, str]:
    box = Appliance(agent_factory, tmp_path, home.issue_image(), "ap", RUNNING, **kwargs)
    iid = box.instance_id()
    _wait_running(home, [iid])
    return box, iid


def _nothing_installed(box: Appliance, version: str) -> None:
    assert box.installs() == [], box.installs()
    assert not list(box.update_dir.glob(f"{version}.raucb*")), list(box.update_dir.iterdir())
    assert not (box.update_dir / "pending.json").exists() and not (box.update_dir / "reboot").exists()
    assert not any(c["args"][:2] == ["status", "mark-active"] for c in rauc_calls(box.rauc))


def test_agent_restarted_mid_download_resumes_from_what_it_has(home, agent_factory, tmp_path):
    keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
    raucb = _make_bundle(tmp_path, keys, NEWER, size=BIG)
    home.cli("update", "publish", str(raucb))
    box, iid = _one_appliance(home, agent_factory, tmp_path)
    home.cli("update", "rollout", NEWER, "--connector", home.connector)
    _wait_part(box, NEWER)
    box.agent.proc.kill()  # power lost half way
    box.agent.proc.wait(10)
    kept = (box.update_dir / f"{NEWER}.raucb.part").stat().st_size
    assert 0 < kept < raucb.stat().st_size
    box.agent.start()
    row = _wait_state(home, iid, NEWER, ("rebooting", "failed"), timeout=180)
    assert row["state"] == "rebooting", row
    text = box.agent.log()
    resumed = [int(line.split(" at ")[1].split()[0]) for line in text.splitlines()
               if "resuming the download at" in line]
    assert resumed and resumed[0] > 0, text[-3000:]
    assert [c["sha256"] for c in box.installs()] == [sha256_of(raucb)]


def test_home_going_away_mid_download_resumes(home, agent_factory, tmp_path):
    keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
    raucb = _make_bundle(tmp_path, keys, NEWER, size=BIG)
    home.cli("update", "publish", str(raucb))
    box, iid = _one_appliance(home, agent_factory, tmp_path)
    home.cli("update", "rollout", NEWER, "--connector", home.connector)
    _wait_part(box, NEWER)
    home.kill()
    time.sleep(1)
    kept = (box.update_dir / f"{NEWER}.raucb.part").stat().st_size
    assert 0 < kept < raucb.stat().st_size
    home.serve()
    row = _wait_state(home, iid, NEWER, ("rebooting", "failed"), timeout=180)
    assert row["state"] == "rebooting", row
    assert [c["sha256"] for c in box.installs()] == [sha256_of(raucb)]
    assert "resuming the download at" not in box.agent.log(), "the same process goes on where it was"


def test_bundle_changed_at_home_after_publish_is_refused_and_nothing_installed(home, agent_factory, tmp_path):
    """Tampered or truncated between publish and download: the offer's SHA256 and size catch it."""
    keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
    box, iid = _one_appliance(home, agent_factory, tmp_path)
    stored = home.state / "update" / "bundles"
    for version, spoil, reason in (
            (NEWER, "tamper", "SHA256 does not match"),
            ("0.1.0.20260303000000", "truncate", "does not match the offer's size")):
        home.cli("update", "publish", str(_make_bundle(tmp_path, keys, version, size=1536 * 1024)))
        path = stored / f"{version}.raucb"
        data = bytearray(path.read_bytes())
        if spoil == "tamper":
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[:len(data) // 2]
        path.write_bytes(bytes(data))
        home.cli("update", "rollout", version, "--connector", home.connector)
        row = _wait_state(home, iid, version, ("failed", "installed", "rebooting"))
        assert row["state"] == "failed" and reason in row["detail"], row
        _nothing_installed(box, version)
        assert f"{version} failed" in home.cli("update", "status").stdout
    assert box.agent.alive()


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small /data stand-in (tmpfs): {res.stderr.strip()}")


@pytest.fixture
def small_data(tmp_path):
    """Mount points of small tmpfs filesystems (the appliance's /data, full); unmounted at teardown."""
    mounted: list[Path] = []

    def make(where: Path, size: str) -> Path:
        _mount_tmpfs(where, size)
        mounted.append(where)
        return where
    yield make
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` up to its last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for block in (b"\0" * (1 << 20), b"\0" * 4096):
            try:
                while True:
                    fh.write(block)
            except OSError:
                pass
    return filler


def test_data_too_small_for_the_bundle_refuses_the_offer(home, agent_factory, tmp_path, small_data):
    """/data smaller than the bundle plus the agent's margin: refused before a byte is fetched."""
    keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
    home.cli("update", "publish", str(_make_bundle(tmp_path, keys, NEWER, size=BIG)))
    box = Appliance(agent_factory, tmp_path, home.issue_image(), "small", RUNNING)
    box.agent.stop()
    small_data(box.agent.state, "96m")
    box.agent.start()
    iid = box.instance_id()
    _wait_running(home, [iid])
    home.cli("update", "rollout", NEWER, "--connector", home.connector)
    row = _wait_state(home, iid, NEWER, ("failed", "downloading", "installed", "rebooting"))
    assert row["state"] == "failed" and "not enough space" in row["detail"], row
    _nothing_installed(box, NEWER)
    assert f"{NEWER} failed (refused: not enough space" in home.cli("update", "status").stdout
    box.agent.stop()


def test_data_filling_up_during_the_download_fails_it_and_says_so(home, agent_factory, tmp_path, small_data):
    """The download fails, the partial bundle is deleted (giving the space back), the
    failure reaches home, nothing is installed, the agent goes on."""
    keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
    home2_version = NEWER
    home.cli("update", "publish", str(_make_bundle(tmp_path, keys, home2_version, size=BIG)))
    box2 = Appliance(agent_factory, tmp_path, home.issue_image(), "filling", RUNNING)
    box2.agent.stop()
    small_data(box2.agent.state, "340m")
    box2.agent.start()
    iid2 = box2.instance_id()
    _wait_running(home, [iid2])
    home.cli("update", "rollout", home2_version, "--connector", home.connector)
    _wait_part(box2, home2_version)
    home.kill()  # home away for a moment; meanwhile something else fills /data
    filler = _fill(box2.agent.state)
    home.serve()
    row = _wait_state(home, iid2, home2_version, ("failed", "installed", "rebooting"), timeout=120)
    assert row["state"] == "failed" and "No space left" in row["detail"], row
    _nothing_installed(box2, home2_version)
    assert box2.agent.alive()
    filler.unlink()
    box2.agent.stop()
