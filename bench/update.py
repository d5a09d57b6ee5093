#!/usr/bin/env python3
"""Whole-image updates (issue 14): bundle size, rollout to committed, rollback, download rate.

Boots a finished image once under qemu (the boot test's rig: a copy of the
image's home state on 127.0.0.1, restricted user networking with guestfwd,
a copy-on-write disk), then:

1. publishes the image's own bundle with a newer version and rolls it out:
   seconds from `rollout` to the download being complete, to `installed`
   (RAUC wrote slot B), to `rebooting`, to `committed` (slot B booted,
   checked in and marked good); download MiB/s through home's channel;
2. (unless --no-rollback) publishes a bundle whose agent never starts and
   rolls it out: seconds from `rollout` to `rolled_back` (three trial boots
   rebooted by the trial deadline, GRUB's fallback, the report home).

Also bundle size against the OVA's. Goals (issue 14): bundle <= OVA,
rollout to committed <= 3 min and rollback <= 5 min under TCG. Times are
home's view, polled once a second.

3. Without qemu (``--download-only`` runs just this): download MiB/s of a real
   agent process (``tether-agent run``) pulling a published bundle from a real
   home over its channel, direct and through an HTTP CONNECT proxy (tinyproxy
   with basic auth), in the same run, alternating, several rounds, and their
   ratio. The seconds run from the agent's first partial file to the moment it
   hands the complete, SHA256-checked bundle to rauc (a logging stand-in that
   fails the install, so every round is a fresh download; see
   tests/integration/homeproc.fake_rauc).

Figures are merged into bench/results/update.json (a run keeps the keys it
did not measure).

    .venv/bin/python bench/update.py [--image-dir images/<name>] [--no-rollback] [--download-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import bootrun
from homerig import RigError, start_home
import vm

from tether.home import paths, updatekeys

RESULTS = ROOT / "bench" / "results" / "update.json"
DEADLINE = 60
MiB = 1024 * 1024


def newest_image(images: Path) -> Path | None:
    done = sorted((m.parent for m in images.glob("*/manifest.json")
                   if (m.parent / f"{m.parent.name}.raucb").exists()), key=lambda p: p.stat().st_mtime)
    return done[-1] if done else None


def _status(home) -> dict:
    return json.loads(home.cli("update", "status", "--json").stdout)


def follow(home, machine, instance: str, version: str, until: tuple[str, ...], timeout: float) -> dict:
    """Seconds (from now) at which each state, and the complete download, were first seen."""
    started, seen = time.monotonic(), {}
    while time.monotonic() - started < timeout:
        if not machine.running():
            raise RigError("the VM stopped")
        rows = [r for r in _status(home)["progress"] if r["instance_id"] == instance and r["version"] == version]
        if rows:
            row = rows[0]
            now = round(time.monotonic() - started, 1)
            seen.setdefault(row["state"], now)
            if row["state"] == "downloading" and row.get("percent") == 100:
                seen.setdefault("downloaded", now)
            if row["state"] in until:
                seen["final"] = row["state"]
                seen["detail"] = row.get("detail")
                return seen
        time.sleep(1.0)
    raise RigError(f"update {version} did not reach {until} within {timeout:.0f} s; seen {seen}")


def run(image_dir: Path, accelerator: str, rollback: bool, timeout: float) -> dict:
    image = bootrun.load_image(image_dir)
    manifest = json.loads((image_dir / "manifest.json").read_text())
    raucb = image_dir / f"{image.name}.raucb"
    ova = image_dir / f"{image.name}.ova"
    figures: dict = {"image": image.name, "accelerator": accelerator,
                     "bundle_mib": round(raucb.stat().st_size / MiB, 1),
                     "ova_mib": round(ova.stat().st_size / MiB, 1)}
    figures["bundle_le_ova"] = raucb.stat().st_size <= ova.stat().st_size
    version = manifest["image_version"]
    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp_name:
        tmp = Path(tmp_name)
        home = start_home(image.home_state, tmp, image.image_id, vm.GUEST_HOME_ADDRESS)
        boot = None
        try:
            keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
            good = bootrun.recut_bundle(raucb, tmp / "good.raucb", f"{version}.1", keys)
            bad = bootrun.recut_bundle(raucb, tmp / "bad.raucb", f"{version}.2", keys, broken=True) \
                if rollback else None
            boot = bootrun.start(image, home, tmp / "vm", {"home.url": bootrun.HOME_URL}, accelerator)
            instance = boot.wait_enrolled(timeout)["instance"]
            boot.wait_checked_in(instance, timeout)
            home.cli("update", "publish", str(good))
            home.cli("update", "rollout", f"{version}.1", "--connector", home.connector)
            seen = follow(home, boot.machine, instance, f"{version}.1", ("committed", "failed", "rolled_back"),
                          timeout)
            figures["update"] = seen
            if "downloaded" in seen and "downloading" in seen:
                spent = max(0.5, seen["downloaded"] - seen.get("offered", 0.0))
                figures["download_mib_s_through_home"] = round(good.stat().st_size / MiB / spent, 1)
            if rollback and seen.get("final") == "committed":
                home.cli("update", "publish", str(bad))
                home.cli("update", "rollout", f"{version}.2", "--connector", home.connector,
                         "--trial-deadline", str(DEADLINE))
                figures["rollback"] = follow(home, boot.machine, instance, f"{version}.2",
                                             ("rolled_back", "committed", "failed"), timeout * 2)
        finally:
            if boot is not None:
                boot.stop()
            home.stop()
    return figures


def _agent_bundle(tmp: Path, keys, version: str, size: int) -> Path:
    """A signed bundle of ``size`` incompressible bytes (tests/integration/test_updates.py's way)."""
    from tether.image import bundle
    root = tmp / f"root-{version}"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=debian\n")
    (root / "blob").write_bytes(os.urandom(size))
    tar = tmp / f"rootfs-{version}.tar"
    bundle.rootfs_tar(root, tar)
    out = tmp / f"bench-{version}.raucb"
    bundle.create(tar, out, version, keys.signing_cert, keys.signing_key)
    tar.unlink()
    shutil.rmtree(root)
    return out


def download_rates(rounds: int = 3, size_mib: int = 96, timeout: float = 300.0) -> dict:
    """Agent-process download MiB/s through home, direct and through the CONNECT proxy."""
    import homeproc

    running = "0.1.0.20260101000000"
    with tempfile.TemporaryDirectory(prefix="bench-update-dl-") as tmp_name:
        tmp = Path(tmp_name)
        home = homeproc.HomeProcess.start(tmp / "home", connector="direct", max_instances=1, cluster="bench-d")
        proxy = homeproc.Tinyproxy(tmp).start()
        agents: dict[str, dict] = {}
        try:
            home.cli("connector", "create", "proxied", "--max-instances", "1", "--cluster", "bench-p")
            keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
            for name in ("direct", "proxied"):
                root = tmp / name
                credential = home.issue_image(connector=name)
                etc = homeproc.install_credential(credential, root / "etc")
                rauc = homeproc.fake_rauc(root / "rauc", install_fails="bench: no slot to write")
                (root / "cmdline").write_text("rauc.slot=A\n")
                (root / "image-version").write_text(running + "\n")
                firstboot = root / "firstboot.json"
                firstboot.write_text(json.dumps({"proxy": proxy.url} if name == "proxied" else {}))
                args = homeproc.agent_run_args(
                    etc, root / "state", firstboot, homeproc.fake_dmi(root / "dmi"),
                    ["--log-level", "INFO", "--cmdline", str(root / "cmdline"),
                     "--image-version-file", str(root / "image-version"), "--rauc", str(rauc)])
                proc = homeproc.spawn_agent(args, root / "agent.log")
                agents[name] = {"root": root, "rauc": rauc, "proc": proc, "mib_s": []}
            deadline = time.monotonic() + 60
            while len(_status(home)["running"]) < 2:
                if time.monotonic() > deadline:
                    raise RigError(f"the bench agents did not say hello; see {tmp}/*/agent.log")
                time.sleep(0.2)
            size = 0
            for n in range(rounds):
                version = f"0.1.0.2026020100000{n}"
                raucb = _agent_bundle(tmp, keys, version, size_mib * MiB)
                size = raucb.stat().st_size
                home.cli("update", "publish", str(raucb))
                raucb.unlink()
                order = ("direct", "proxied") if n % 2 == 0 else ("proxied", "direct")
                for name in order:
                    agent = agents[name]
                    part = agent["root"] / "state" / "update" / f"{version}.raucb.part"
                    home.cli("update", "rollout", version, "--connector", name)
                    stop = time.monotonic() + timeout
                    while not part.exists():
                        if time.monotonic() > stop:
                            raise RigError(f"{name}: no download of {version}; see {agent['root']}/agent.log")
                        time.sleep(0.002)
                    began = time.time()
                    while not (calls := [c for c in homeproc.rauc_calls(agent["rauc"])
                                         if c["args"][:1] == ["install"] and version in c["args"][1]]):
                        if time.monotonic() > stop:
                            raise RigError(f"{name}: {version} not downloaded; see {agent['root']}/agent.log")
                        time.sleep(0.01)
                    rate = size / MiB / (calls[0]["time"] - began)
                    agent["mib_s"].append(round(rate, 1))
                    print(f"round {n + 1}/{rounds} {name}: {rate:.1f} MiB/s", flush=True)
            if "CONNECT" not in proxy.log():
                raise RigError(f"the proxied agent did not go through the proxy; see {proxy.log_path}")
        finally:
            for agent in agents.values():
                homeproc.stop_process(agent["proc"])
            proxy.stop()
            home.stop()
    direct, proxied = agents["direct"]["mib_s"], agents["proxied"]["mib_s"]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"bundle_mib": round(size / MiB, 1), "rounds": rounds,
            "direct_mib_s": direct, "proxied_mib_s": proxied,
            "direct_median_mib_s": med(direct), "proxied_median_mib_s": med(proxied),
            "proxied_over_direct": round(med(proxied) / med(direct), 2),
            "how": "tether-agent process <- home update.fetch over TLS/WebSocket on 127.0.0.1; "
                   "proxied: through tinyproxy (HTTP CONNECT, basic auth); first partial byte to rauc install"}


def _merge(figures: dict) -> dict:
    try:
        merged = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        merged = {}
    merged.update(figures)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-dir", type=Path, help="images/<name> (default: newest with a bundle)")
    parser.add_argument("--no-rollback", action="store_true", help="skip the rollback run (about 5 min)")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--download-only", action="store_true",
                        help="only the agent-process download rates, direct and through the proxy (no qemu)")
    parser.add_argument("--rounds", type=int, default=3, help="download rounds per path")
    parser.add_argument("--download-mib", type=int, default=96, help="bundle size of the download rounds")
    args = parser.parse_args()
    figures: dict = {}
    try:
        figures["agent_download"] = download_rates(args.rounds, args.download_mib)
    except RigError as exc:
        print(f"bench update: {exc}", file=sys.stderr)
        return 1
    if not args.download_only:
        image_dir = args.image_dir or newest_image(ROOT / "images")
        if image_dir is None:
            print("bench update: qemu part skipped, no finished image with a bundle under images/ (make image)")
        else:
            accelerator = vm.choose_accelerator(ROOT / "images" / ".cache").accelerator
            try:
                figures.update(run(image_dir.resolve(), accelerator, not args.no_rollback, args.timeout))
            except RigError as exc:
                print(f"bench update: {exc}", file=sys.stderr)
                _merge(figures)
                return 1
    merged = _merge(figures)
    print(json.dumps(merged, indent=2))
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
