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
rollout to committed <= 3 min and rollback <= 5 min under TCG. Writes
bench/results/update.json. Times are home's view, polled once a second.

    .venv/bin/python bench/update.py [--image-dir images/<name>] [--no-rollback]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import bootrun
from homerig import RigError, start_home

from tether.home import paths, updatekeys
from tether.image import vm

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-dir", type=Path, help="images/<name> (default: newest with a bundle)")
    parser.add_argument("--no-rollback", action="store_true", help="skip the rollback run (about 5 min)")
    parser.add_argument("--timeout", type=float, default=1200.0)
    args = parser.parse_args()
    image_dir = args.image_dir or newest_image(ROOT / "images")
    if image_dir is None:
        print("bench update: skipped, no finished image with a bundle under images/ (make image)")
        return 0
    accelerator = vm.choose_accelerator(ROOT / "images" / ".cache").accelerator
    try:
        figures = run(image_dir.resolve(), accelerator, not args.no_rollback, args.timeout)
    except RigError as exc:
        print(f"bench update: {exc}", file=sys.stderr)
        return 1
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
