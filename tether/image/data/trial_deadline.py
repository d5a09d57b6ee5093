#!/usr/bin/python3
"""tether-trial-deadline: reboot a trial boot of a new slot that never becomes healthy.

Installed by the base disk as /usr/local/sbin/tether-trial-deadline and run as
root by tether-trial-deadline.service at every boot. A boot is a trial when
the booted slot (rauc.slot= on the kernel command line) has not been marked
good yet (<slot>_TRY != 0 in grubenv) and the other slot is a fallback GRUB
can still boot (OK=1 and tries left). If the agent does not mark the slot
good before the deadline, this reboots: GRUB counts the try and, after
MAX_TRIES, boots the other slot (tether.image.bootconf). A normal boot with
nothing to fall back to is never rebooted, so a broken agent on the only good
slot cannot make the appliance reboot forever.

The deadline comes from /var/lib/tether/update/trial.json
({"deadline_seconds": N}, written by the agent with home's offer before it
reboots into the new slot), bounded; 300 s when absent. No imports beyond the
standard library: this must work whatever the new slot's agent does.
"""

import json
import subprocess
import sys
import time

GRUBENV = "/boot/grub/grubenv"
TRIAL = "/var/lib/tether/update/trial.json"
DEFAULT_DEADLINE = 300
MIN_DEADLINE, MAX_DEADLINE = 60, 3600
MAX_TRIES = 3
POLL = 10


def parse_env(text: str) -> dict:
    """grubenv: '# GRUB Environment Block' then KEY=VALUE lines, padded with '#'."""
    env = {}
    for line in text.splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        env[key] = value
    return env


def booted_slot(cmdline: str):
    for word in cmdline.split():
        if word.startswith("rauc.slot="):
            return word.split("=", 1)[1]
    return None


def is_trial(env: dict, slot) -> bool:
    """The booted slot is unconfirmed and GRUB has another slot to fall back to."""
    if slot not in ("A", "B"):
        return False
    other = "B" if slot == "A" else "A"
    try:
        other_tries = int(env.get(f"{other}_TRY", "0"))
    except ValueError:
        return False
    return env.get(f"{slot}_TRY", "0") != "0" and env.get(f"{other}_OK") == "1" and other_tries < MAX_TRIES


def deadline(text) -> int:
    try:
        value = int(json.loads(text)["deadline_seconds"])
    except (TypeError, ValueError, KeyError):
        return DEFAULT_DEADLINE
    return max(MIN_DEADLINE, min(MAX_DEADLINE, value))


def _read(path: str):
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(65536)
    except OSError:
        return None


def _uptime() -> float:
    return float(_read("/proc/uptime").split()[0])


def main() -> int:
    slot = booted_slot(_read("/proc/cmdline") or "")
    limit = deadline(_read(TRIAL))
    while True:
        env = parse_env(_read(GRUBENV) or "")
        if not is_trial(env, slot):
            print(f"slot {slot}: not a trial boot (or marked good); nothing to watch")
            return 0
        if _uptime() >= limit:
            print(f"slot {slot} not marked good {limit} s after boot: rebooting (GRUB counts a failed try)",
                  flush=True)
            subprocess.run(["systemctl", "reboot"], check=False)
            return 1
        time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main())
