"""What the agent does about its boot slot after a boot: the update rules, without I/O.

Inputs: the slot GRUB booted (``rauc.slot=`` on the kernel command line), the
pending update the agent recorded before it rebooted into a new slot (or
None), whether the local self-check passed and whether home accepted the
hello. Output: one :class:`Decision` (mark the booted slot good, mark the
other bad, what to report home, whether the pending record is done).

* A normal boot (nothing pending) marks good after the local self-check
  alone: a home outage never causes a rollback.
* The trial boot of a new slot marks good only after the self-check passed
  *and* home accepted the hello (Mender's commit after the server was
  reached), then reports ``committed``. Until then it does nothing: the
  trial deadline (tether-trial-deadline) and GRUB's try counter decide.
* Booted into the old slot while an update was pending and activated: GRUB
  fell back. Mark the other slot bad (so it is never tried again), report
  ``rolled_back`` with the failed slot's journal, mark the running slot good
  after the self-check.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pending:
    """Recorded (on /data) before the reboot into the new slot."""

    version: str
    slot: str  # the slot the update was installed into ("A" / "B")
    from_version: str
    activated: bool  # the new slot was made primary (a reboot will try it)


@dataclass(frozen=True)
class Decision:
    mark_good: bool = False  # the booted slot
    mark_other_bad: bool = False
    report: str | None = None  # "committed" | "rolled_back" | None
    clear_pending: bool = False
    wait: bool = False  # not yet: ask again when the self-check or hello changes


def after_boot(booted: str | None, pending: Pending | None, selfcheck_ok: bool, hello_accepted: bool) -> Decision:
    if booted not in ("A", "B"):
        return Decision()  # not booted by the A/B GRUB (a test, a rescue boot): touch nothing
    if pending is None:
        return Decision(mark_good=True) if selfcheck_ok else Decision(wait=True)
    if booted == pending.slot:
        if selfcheck_ok and hello_accepted:
            return Decision(mark_good=True, report="committed", clear_pending=True)
        return Decision(wait=True)
    if not pending.activated:
        # installed but never activated (install failed half way, or aborted): nothing was tried
        return Decision(mark_good=selfcheck_ok, clear_pending=True, wait=not selfcheck_ok)
    return Decision(mark_good=selfcheck_ok, mark_other_bad=True, report="rolled_back", clear_pending=True)


def booted_slot(cmdline: str) -> str | None:
    for word in cmdline.split():
        if word.startswith("rauc.slot="):
            return word.split("=", 1)[1] or None
    return None


def other(slot: str) -> str:
    return {"A": "B", "B": "A"}[slot]
