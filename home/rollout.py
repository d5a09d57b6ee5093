"""Which instance gets an update offer next: the rollout rules, without I/O.

The server feeds it the instances of a connector (with their cluster, running
version and update state) and the rollout (version, canary size, paused or
aborted); it answers the instances to offer the update to now. Rules (issue
14):

* never more than one instance of a cluster updating at a time, so a
  directory always keeps a connector (an instance is *updating* from the
  offer until it reports committed, rolled back or failed); a cluster spans
  connectors, so the caller also names the clusters already busy with an
  update of another connector or another version (``busy``);
* a canary step: the first ``canary`` instances (by instance id) that take
  this version (an instance that already runs it, or something newer, is no
  canary) first, the rest only after every canary committed; a canary that
  rolled back or failed stops the rollout (nothing more is offered until an
  operator acts);
* a version that rolled back on an instance is never offered to it again;
* only versions newer than what the instance runs are offered;
* paused or aborted: nothing new is offered (an install already under way
  finishes; abort additionally tells the offered ones to drop it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tether import imageversion

#: Per-instance states reported by the agent, in order.
OFFERED, DOWNLOADING, INSTALLED, REBOOTING, COMMITTED, ROLLED_BACK, FAILED = (
    "offered", "downloading", "installed", "rebooting", "committed", "rolled_back", "failed")
IN_PROGRESS = (OFFERED, DOWNLOADING, INSTALLED, REBOOTING)
FINISHED = (COMMITTED, ROLLED_BACK, FAILED)
STATES = IN_PROGRESS + FINISHED
#: Allowed transitions: an agent's report that does not fit is refused.
_NEXT = {
    OFFERED: {DOWNLOADING, INSTALLED, FAILED},
    DOWNLOADING: {DOWNLOADING, INSTALLED, FAILED},
    # the "rebooting" report may be lost in the reboot itself
    INSTALLED: {REBOOTING, COMMITTED, ROLLED_BACK, FAILED},
    REBOOTING: {COMMITTED, ROLLED_BACK, FAILED},
}


class RolloutError(ValueError):
    """A report or command that does not fit the rollout; the message says why."""


@dataclass
class Instance:
    instance_id: str
    cluster: str
    version: str  # what it runs now (its hello)
    state: str | None = None  # for the rollout's version
    rolled_back: set[str] = field(default_factory=set)  # versions that rolled back here


@dataclass
class Rollout:
    version: str
    connector: str
    canary: int = 0
    paused: bool = False
    aborted: bool = False


def transition(current: str | None, new: str) -> str:
    """The instance's next state; RolloutError for a report out of order."""
    if new not in STATES:
        raise RolloutError(f"unknown update state {new!r}")
    if current not in _NEXT or new not in _NEXT[current]:
        raise RolloutError(f"update state {new!r} cannot follow {current!r}")
    return new


def _wants(inst: Instance, rollout: Rollout) -> bool:
    return (inst.state is None and rollout.version not in inst.rolled_back
            and imageversion.newer(rollout.version, inst.version))


def to_offer(rollout: Rollout, instances: list[Instance], busy: Iterable[str] = ()) -> list[str]:
    """Instance ids to send the offer to now (possibly none).

    ``busy``: clusters where an instance not in ``instances`` (another
    connector of the cluster) or another version is being updated now.
    """
    if rollout.paused or rollout.aborted:
        return []
    ordered = sorted(instances, key=lambda i: i.instance_id)
    canaries = [i for i in ordered if _eligible_ever(i, rollout)][:rollout.canary]
    if any(i.state in (ROLLED_BACK, FAILED) for i in canaries):
        return []
    pool = canaries if any(i.state != COMMITTED for i in canaries) else ordered
    busy = set(busy) | {i.cluster for i in instances if i.state in IN_PROGRESS}
    offers = []
    for inst in pool:
        if inst.cluster in busy or not _wants(inst, rollout):
            continue
        offers.append(inst.instance_id)
        busy.add(inst.cluster)
    return offers


def _eligible_ever(inst: Instance, rollout: Rollout) -> bool:
    """An instance that takes (or took) this version: only those can be canaries."""
    return inst.state is not None or _wants(inst, rollout)


def summary(instances: list[Instance]) -> dict[str, int]:
    counts = {state: 0 for state in STATES}
    counts["pending"] = 0
    for inst in instances:
        counts[inst.state or "pending"] += 1
    return counts
