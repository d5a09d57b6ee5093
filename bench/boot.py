#!/usr/bin/env python3
"""Boot speed: qemu start -> enrollment -> first check-in, against the same disk's own boot.

Boots a finished image once (the boot test's setup: a copy of the image's
home state on 127.0.0.1, the OVF's hardware, the home URL on an ISO-transport
CD, a copy-on-write copy of the disk) and records, in seconds from qemu
start, when these show up:

* console: tether-firstboot finished, tether-agent starting, tether-agent
  started, ``multi-user.target`` reached (systemd's own status lines);
* home's log: the instance ``enrolled``, its first ``hello`` (check-in).

The agent's own share is check-in minus "agent starting": what the agent
adds on top of the operating system's boot. The issue's goal is check-in
within 20 s under TCG. One boot varies by a second or two with the host's
load (written next to it), so it boots the image several times (--boots, 3
by default), one after the other, and reports each figure's median next to
every boot's figures. Writes bench/results/boot.json.

    .venv/bin/python bench/boot.py --image-dir images/<name> [--home-state DIR] [--boots N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import bootrun
from homerig import RigError, start_home
import vm


RESULTS = ROOT / "bench" / "results" / "boot.json"
GOAL_S = 20.0
#: Console milestones: name -> text systemd prints (escape codes stripped).
CONSOLE_MILESTONES = {
    "firstboot_done_s": "Finished tether-firstboot",
    "agent_starting_s": "Starting tether-agent",
    "agent_started_s": "Started tether-agent",
    "multi_user_s": "Reached target multi-user.target",
}


def newest_image(images: Path) -> Path | None:
    """The most recently finished image (one with a manifest) under images/."""
    done = sorted((m.parent for m in images.glob("*/manifest.json")), key=lambda p: p.stat().st_mtime)
    return done[-1] if done else None


def watch(boot: bootrun.Boot, timeout: float) -> dict:
    """Poll console and home log until check-in and multi-user.target, or timeout."""
    seen: dict[str, float] = {}
    home: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and boot.machine.running():
        console = boot.console()
        for name, marker in CONSOLE_MILESTONES.items():
            if name not in seen and marker in console:
                seen[name] = round(boot.machine.elapsed(), 1)
        home = boot.home_milestones()
        if "checked_in_s" in home and "multi_user_s" in seen:
            break
        time.sleep(0.25)
    return {**seen, **home}


def boot_once(image: bootrun.BootImage, timeout: float, accelerator: str) -> dict:
    """One boot of a fresh copy of the disk against a fresh home: its milestones."""
    with tempfile.TemporaryDirectory(prefix="tether-bench-boot-") as tmp:
        home = start_home(image.home_state, Path(tmp), image.image_id, vm.GUEST_HOME_ADDRESS)
        boot = None
        try:
            boot = bootrun.start(image, home, Path(tmp) / "vm", {"home.url": bootrun.HOME_URL},
                                 accelerator)
            figures = watch(boot, timeout)
        finally:
            if boot is not None:
                boot.stop()
            home.stop()
    if "checked_in_s" in figures and "agent_starting_s" in figures:
        figures["agent_share_s"] = round(figures["checked_in_s"] - figures["agent_starting_s"], 1)
    figures["host_load_1m_after"] = round(os.getloadavg()[0], 2)
    return figures


def medians(boots: list[dict]) -> dict:
    """Each milestone's median over the boots that reached it."""
    keys = dict.fromkeys(key for boot in boots for key in boot)
    return {key: round(statistics.median(b[key] for b in boots if key in b), 1) for key in keys}


def run(image_dir: Path, home_state: Path | None, timeout: float, accelerator: str,
        boots: int) -> dict:
    image = bootrun.load_image(image_dir, home_state)
    figures = []
    for number in range(1, boots + 1):
        figures.append(boot_once(image, timeout, accelerator))
        print(f"  boot {number}/{boots}: enrolled {figures[-1].get('enrolled_s', '-')} s, "
              f"checked in {figures[-1].get('checked_in_s', '-')} s", flush=True)
    return {"image": image.name, "accelerator": accelerator, "vcpu": vm.OVF_CPUS,
            "memory_mib": vm.OVF_MEMORY_MIB, "goal_checked_in_s": GOAL_S,
            "host_cpus": os.cpu_count(), "boots": len(figures),
            "median": medians(figures), "each_boot": figures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-dir", type=Path, help="images/<name> (default: newest finished)")
    parser.add_argument("--home-state", type=Path, help="home state of the image (default images/.home)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--boots", type=int, default=3, help="boots to take the median of (default 3)")
    args = parser.parse_args()
    if args.boots < 1:
        parser.error("--boots must be 1 or more")
    image_dir = args.image_dir or newest_image(ROOT / "images")
    if image_dir is None:
        print("bench boot: skipped, no finished image under images/ (make image)")
        return 0
    accelerator = vm.choose_accelerator(ROOT / "images" / ".cache").accelerator
    print(f"bench boot: {image_dir.name} under {accelerator}, {args.boots} boot(s), "
          f"about a minute each", flush=True)
    try:
        result = run(image_dir.resolve(), args.home_state, args.timeout, accelerator, args.boots)
    except (RigError, vm.VmError) as exc:
        print(f"bench boot: failed: {exc}", file=sys.stderr)
        return 1
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        if key != "each_boot":
            print(f"  {key}: {value}")
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0 if all("checked_in_s" in boot for boot in result["each_boot"]) else 1


if __name__ == "__main__":
    sys.exit(main())
