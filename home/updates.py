"""Whole-image updates on home's side (issue 14): publish, roll out, serve bundles, record progress.

Two faces. The operator's (:func:`publish`, :func:`start_rollout`,
:func:`set_status`, :func:`report`; ``tether-home update ...``) works with
home stopped and tells a running home through its control socket. The
running server's (:class:`Updates`, owned by the hub) offers a rollout's
version to the instances :func:`tether.home.rollout.to_offer` picks, serves
the bundle in bounded pieces over the agents' own TLS channel
(``update.fetch``: the same way out as every socket, CONNECT proxy included,
no second listener), and records what the agents report
(``update.report``). Decisions stay in the sans-I/O :mod:`tether.home.rollout`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tether import imageversion
from tether.atomicfile import replacing
from tether import protocol as p
from tether.home import rollout, updatekeys
from tether.home.agentsockets import AgentSocket
from tether.home.errors import AgentUnavailable, HomeError, RequestFailed
from tether.home.logs import event
from tether.home.paths import StatePaths
from tether.home.updatestore import UpdateStore

if TYPE_CHECKING:
    from tether.home.hub import Hub

log = logging.getLogger("tether.home.updates")
#: How long a trial boot of the new slot may take to become healthy (the agent's
#: trial deadline; GRUB's try counter does the rest).
DEADLINE_SECONDS = 300
#: The appliance's trial-deadline service clamps to this range as well.
MIN_DEADLINE, MAX_DEADLINE = 60, 3600
OFFER_TIMEOUT = 20.0


class UpdateError(ValueError):
    """An update command that cannot be done; the text says what to do."""


def store_path(paths: StatePaths) -> Path:
    return paths.root / "updates.sqlite3"


def bundles_dir(paths: StatePaths) -> Path:
    return paths.root / "update" / "bundles"


def open_store(paths: StatePaths) -> UpdateStore:
    paths.require_initialized()
    return UpdateStore(store_path(paths))


# ------------------------------------------------------------------ operator side

def publish(paths: StatePaths, bundle: Path, *, verify=None) -> dict:
    """Check a bundle (signature by this home's update key, product) and keep a copy.

    ``verify`` is :func:`tether.image.bundle.verify` (RAUC itself); passed in so
    home's import graph does not need the image tooling unless publishing.
    """
    if verify is None:
        from tether.image.bundle import verify
    from tether.image.bundle import BundleError

    paths.require_initialized()
    keys = updatekeys.ensure(paths)
    if not bundle.is_file():
        raise UpdateError(f"{bundle} not found: give the .raucb file `make image` or `make bundle` wrote")
    size = bundle.stat().st_size
    if size > p.MAX_BUNDLE_BYTES:
        raise UpdateError(f"{bundle.name} is {size} bytes, above the {p.MAX_BUNDLE_BYTES} bytes an "
                          "agent downloads; build a smaller root filesystem")
    try:
        info = verify(bundle, keys.ca_cert)
    except BundleError as exc:
        raise UpdateError(str(exc)) from None
    try:
        imageversion.parse(info.version)
    except imageversion.VersionError as exc:
        raise UpdateError(f"{bundle.name}: {exc}; build it with `make image` / `make bundle`") from None
    target = bundles_dir(paths) / f"{info.version}.raucb"
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with replacing(target, mode=0o644) as partial:
        shutil.copyfile(bundle, partial)
    store = open_store(paths)
    try:
        store.add_bundle(info.version, target.name, info.sha256, info.size, info.compatible)
    finally:
        store.close()
    return {"version": info.version, "sha256": info.sha256, "size": info.size,
            "compatible": info.compatible, "file": str(target)}


def start_rollout(paths: StatePaths, version: str, connector: str, canary: int,
                  deadline_seconds: int = DEADLINE_SECONDS) -> dict:
    from tether.home.store import Store

    if canary < 0:
        raise UpdateError("--canary must be 0 or more")
    if not MIN_DEADLINE <= deadline_seconds <= MAX_DEADLINE:
        raise UpdateError(f"--trial-deadline must be {MIN_DEADLINE}..{MAX_DEADLINE} seconds")
    store = open_store(paths)
    try:
        if store.bundle(version) is None:
            known = ", ".join(b["version"] for b in store.bundles()) or "none"
            raise UpdateError(f"no published bundle has version {version} (published: {known}); "
                              "run `tether-home update publish BUNDLE` first")
        home = Store(paths.db)
        try:
            home.connector(connector)
        finally:
            home.close()
        store.start_rollout(version, connector, canary, deadline_seconds)
        return store.rollout(connector)
    finally:
        store.close()


def set_status(paths: StatePaths, connector: str, status: str) -> dict:
    store = open_store(paths)
    try:
        row = store.set_rollout_status(connector, status)
    finally:
        store.close()
    if row is None:
        raise UpdateError(f"connector {connector} has no rollout; start one with "
                          "`tether-home update rollout VERSION --connector C`")
    return row


def report(paths: StatePaths) -> dict:
    store = open_store(paths)
    try:
        return {"bundles": store.bundles(), "rollouts": store.rollouts(),
                "progress": store.progress_of(), "running": store.running()}
    finally:
        store.close()


def instance_states(doc: dict) -> dict[str, str]:
    """Per instance one line: the image it runs and its newest update's state. Shared by
    `update status` and the status page, so both say the same thing in the same words."""
    progress = {(r["instance_id"]): r for r in doc["progress"]}  # newest per instance (ordered)
    states = {}
    for run in doc["running"]:
        row = progress.get(run["instance_id"])
        state = "-" if row is None else f"{row['version']} {row['state']}"
        if row and row["state"] == rollout.DOWNLOADING and row.get("percent") is not None:
            state += f" {row['percent']}%"
        if row and row.get("detail") and row["state"] in (rollout.ROLLED_BACK, rollout.FAILED):
            state += f" ({row['detail']})"
        states[run["instance_id"]] = (f"runs {run['image_version'] or '?'} "
                                      f"(slot {run['boot_slot'] or '?'})\tupdate: {state}")
    return states


def render(doc: dict) -> str:
    lines = ["bundles:"]
    lines += [f"  {b['version']}\t{b['size']} bytes\tsha256 {b['sha256'][:16]}" for b in doc["bundles"]] \
        or ["  (none published)"]
    lines.append("rollouts:")
    lines += [f"  {r['connector']}\t{r['version']}\t{r['status']}\tcanary={r['canary']}"
              for r in doc["rollouts"]] or ["  (none)"]
    lines.append("instances:")
    states = instance_states(doc)
    for run in doc["running"]:
        lines.append(f"  {run['instance_id']}\t{run['connector']}\t{states[run['instance_id']]}")
    if not doc["running"]:
        lines.append("  (no instance has said hello since updates exist)")
    return "\n".join(lines)


# ------------------------------------------------------------------ running server

class Updates:
    """The running home's update service: offers, bundle pieces, progress reports."""

    def __init__(self, hub: Hub, paths: StatePaths) -> None:
        self.hub = hub
        self.paths = paths
        self.store = UpdateStore(store_path(paths))
        self._drive_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.store.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        """A background step that failed (home's disk full, an agent gone) is one log
        line; the next hello or report drives the rollout again."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            event(log, logging.ERROR, "update_step_failed", error=f"{type(exc).__name__}: {exc}",
                  hint="the rollout goes on at the instance's next hello or report")

    # ---- hello

    def on_hello(self, peer: AgentSocket) -> None:
        ident = peer.identity
        if ident.role != "instance" or peer.hello is None:
            return
        # bookkeeping: a full disk must not keep the instance out (issue 11, point 7)
        self.hub.books.write("update_running", self.store.record_running, ident.instance_id,
                             ident.connector, peer.hello.get("image_version"), peer.hello.get("boot_slot"))
        self._spawn(self._resume(peer))
        self._spawn(self.drive(ident.connector))

    async def _resume(self, peer: AgentSocket) -> None:
        """Home has this instance offered or downloading the rollout's version, and it said
        hello: it may have restarted (power lost, agent restarted) half way, and an agent
        keeps no download task across a restart. The offer again: the agent resumes from
        the part on its disk, or answers that the download is under way."""
        ident = peer.identity
        row = self.store.rollout(ident.connector)
        if row is None or row["status"] == "aborted":
            return
        progress = self.store.progress(ident.instance_id, row["version"])
        bundle = self.store.bundle(row["version"])
        if progress is None or bundle is None or progress["state"] not in (rollout.OFFERED, rollout.DOWNLOADING):
            return
        body = {"version": bundle["version"], "sha256": bundle["sha256"], "size": bundle["size"],
                "compatible": bundle["compatible"], "deadline_seconds": row["deadline_seconds"]}
        try:
            response = await peer.request(p.Op.UPDATE, body, timeout=OFFER_TIMEOUT)
        except (RequestFailed, AgentUnavailable) as exc:
            event(log, logging.WARNING, "update_resume_failed", instance=ident.instance_id,
                  version=bundle["version"], code=exc.code.value)
            return  # the next hello tries again
        if not response.body.get("accepted"):
            detail = str(response.body.get("detail") or "refused")[:p.TEXT]
            self.store.set_progress(ident.instance_id, bundle["version"], ident.connector, rollout.FAILED,
                                    detail=f"refused: {detail}")
            event(log, logging.WARNING, "update_refused", instance=ident.instance_id,
                  version=bundle["version"], detail=detail)
            self.drive_cluster(ident.connector)
            return
        event(log, logging.INFO, "update_resumed", instance=ident.instance_id, version=bundle["version"],
              state=response.body.get("state"))

    # ---- offers

    def _cluster_of(self) -> dict[str, str]:
        return {row["name"]: row["cluster"] for row in self.hub.store.connectors()}

    def _instances(self, connector: str, version: str) -> list[rollout.Instance]:
        """The connector's instances a rollout can see: connected ones, and any with progress."""
        cluster = self._cluster_of().get(connector, connector)
        connected = {pe.identity.instance_id for pe in self.hub.agents(connector)}
        running = {r["instance_id"]: r for r in self.store.running(connector)}
        rows = self.store.progress_of(connector)
        rolled: dict[str, set] = {}
        state: dict[str, str] = {}
        for row in rows:
            if row["state"] == rollout.ROLLED_BACK:
                rolled.setdefault(row["instance_id"], set()).add(row["version"])
            if row["version"] == version:
                state[row["instance_id"]] = row["state"]
        ids = connected | set(state)
        return [rollout.Instance(iid, cluster, (running.get(iid) or {}).get("image_version") or "",
                                 state.get(iid), rolled.get(iid, set()))
                for iid in sorted(ids)]

    def _busy_clusters(self) -> set[str]:
        """Clusters with an instance updating now, of any connector and any version: a
        cluster spans connectors, and an older rollout's install finishes after a new one began."""
        clusters = self._cluster_of()
        return {clusters.get(row["connector"], row["connector"]) for row in self.store.progress_of()
                if row["state"] in rollout.IN_PROGRESS}

    async def drive(self, connector: str) -> list[str]:
        """Offer the connector's rollout to whoever :func:`rollout.to_offer` picks now.

        One drive per cluster at a time: the rule "one instance of a cluster updating"
        spans the cluster's connectors, so their offers must not interleave. An offer
        the agent refused frees its cluster again: pick again, and let the cluster's
        other connectors pick too.
        """
        cluster = self._cluster_of().get(connector, connector)
        lock = self._drive_locks.setdefault(cluster, asyncio.Lock())
        offered: list[str] = []
        refused_any = False
        async with lock:
            while True:
                more, refused = await self._drive_once(connector)
                offered += more
                refused_any = refused_any or refused
                if not refused:
                    break
        if refused_any:
            self.drive_cluster(connector, skip=connector)
        return offered

    def drive_cluster(self, connector: str, skip: str | None = None) -> None:
        """Drive every rollout of the connector's cluster (an instance there finished)."""
        clusters = self._cluster_of()
        cluster = clusters.get(connector, connector)
        for name, other in sorted(clusters.items()):
            if other == cluster and name != skip and self.store.rollout(name) is not None:
                self._spawn(self.drive(name))

    async def _drive_once(self, connector: str) -> tuple[list[str], bool]:
        """Offers made now, and whether an agent refused one (its cluster is free again)."""
        row = self.store.rollout(connector)
        if row is None:
            return [], False
        if row["status"] == "aborted":
            await self._abort(connector, None, "rollout aborted by the operator")
            return [], False
        # downloads of a version an operator's newer rollout superseded are dropped (an
        # install under way finishes: it keeps its cluster busy until it is done)
        await self._abort(connector, row["version"], f"superseded by the rollout of {row['version']}")
        bundle = self.store.bundle(row["version"])
        if bundle is None:
            return [], False
        plan = rollout.Rollout(row["version"], connector, row["canary"],
                               paused=row["status"] == "paused")
        offered, refused = [], False
        for iid in rollout.to_offer(plan, self._instances(connector, row["version"]), self._busy_clusters()):
            peer = next((pe for pe in self.hub.agents(connector) if pe.identity.instance_id == iid
                         and not pe.draining), None)
            if peer is None:
                continue
            if await self._offer(peer, bundle, connector, row["deadline_seconds"]):
                offered.append(iid)
            else:
                refused = True
        return offered, refused

    async def _abort(self, connector: str, keep: str | None, detail: str) -> None:
        """Tell instances still offered or downloading a version other than ``keep`` to drop
        it (an install under way finishes: RAUC cannot be stopped half way through a slot)."""
        for row in self.store.progress_of(connector):
            version = row["version"]
            if version == keep or row["state"] not in (rollout.OFFERED, rollout.DOWNLOADING):
                continue
            self.store.set_progress(row["instance_id"], version, connector, rollout.FAILED, detail=detail)
            bundle = self.store.bundle(version)
            peer = next((pe for pe in self.hub.agents(connector)
                         if pe.identity.instance_id == row["instance_id"]), None)
            if peer is None or bundle is None:
                continue
            try:
                await peer.request(p.Op.UPDATE, {"version": version, "sha256": bundle["sha256"],
                                                 "size": bundle["size"], "compatible": bundle["compatible"],
                                                 "action": "abort"}, timeout=OFFER_TIMEOUT)
            except (RequestFailed, AgentUnavailable) as exc:
                event(log, logging.WARNING, "update_abort_failed", instance=row["instance_id"],
                      version=version, code=exc.code.value)

    async def _offer(self, peer: AgentSocket, bundle: dict, connector: str, deadline: int) -> bool:
        iid, version = peer.identity.instance_id, bundle["version"]
        self.store.set_progress(iid, version, connector, rollout.OFFERED)
        body = {"version": version, "sha256": bundle["sha256"], "size": bundle["size"],
                "compatible": bundle["compatible"], "deadline_seconds": deadline}
        try:
            response = await peer.request(p.Op.UPDATE, body, timeout=OFFER_TIMEOUT)
        except (RequestFailed, AgentUnavailable) as exc:
            self.store.set_progress(iid, version, connector, rollout.FAILED,
                                    detail=f"offer refused: {exc.code.value}: {exc.detail}"[:p.TEXT])
            event(log, logging.WARNING, "update_offer_failed", instance=iid, version=version,
                  code=exc.code.value, detail=exc.detail)
            return False
        if not response.body.get("accepted"):
            detail = str(response.body.get("detail") or "refused")[:p.TEXT]
            self.store.set_progress(iid, version, connector, rollout.FAILED, detail=f"refused: {detail}")
            event(log, logging.WARNING, "update_refused", instance=iid, version=version, detail=detail)
            return False
        event(log, logging.INFO, "update_offered", instance=iid, version=version)
        return True

    # ---- agent requests

    def _offered(self, peer: AgentSocket, version: str) -> dict:
        iid = peer.identity.instance_id
        row = self.store.progress(iid, version) if iid else None
        if row is None or row["state"] not in rollout.IN_PROGRESS:
            raise HomeError(p.ErrorCode.NOT_FOUND, f"version {version} is not being offered to this "
                                                   "instance")
        return row

    def handle_fetch(self, peer: AgentSocket, body: dict) -> dict:
        version, offset, length = body["version"], body["offset"], body["length"]
        self._offered(peer, version)
        bundle = self.store.bundle(version)
        if bundle is None:
            raise HomeError(p.ErrorCode.NOT_FOUND, f"bundle {version} is no longer published")
        if offset < 0 or not 0 < length <= p.UPDATE_CHUNK_BYTES or offset > bundle["size"]:
            raise HomeError(p.ErrorCode.BAD_TYPE, f"offset 0..{bundle['size']} and length "
                                                  f"1..{p.UPDATE_CHUNK_BYTES} expected")
        with open(bundles_dir(self.paths) / bundle["file"], "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        return {"data": base64.b64encode(data).decode("ascii"), "size": bundle["size"],
                "eof": offset + len(data) >= bundle["size"]}

    def handle_report(self, peer: AgentSocket, body: dict) -> dict:
        ident = peer.identity
        version, state = body["version"], body["state"]
        row = self.store.progress(ident.instance_id, version)
        current = row["state"] if row else None
        if state == current and state != rollout.DOWNLOADING:
            return {"recorded": True}  # a repeat (the agent retries until home answers)
        if current is not None:  # none: home lost its record; the agent's word is all there is
            try:
                rollout.transition(current, state)
            except rollout.RolloutError as exc:
                raise HomeError(p.ErrorCode.BAD_TYPE, str(exc)) from None
        elif state not in rollout.STATES:
            raise HomeError(p.ErrorCode.BAD_TYPE, f"unknown update state {state!r}")
        percent = body.get("percent")
        self.store.set_progress(ident.instance_id, version, ident.connector, state,
                                percent=max(0, min(100, percent)) if isinstance(percent, int) else None,
                                detail=body.get("detail"), journal=body.get("journal"),
                                slot=body.get("slot"))
        if state != rollout.DOWNLOADING:
            event(log, logging.WARNING if state in (rollout.ROLLED_BACK, rollout.FAILED) else logging.INFO,
                  "update_state", instance=ident.instance_id, version=version, state=state,
                  detail=body.get("detail"))
        if state in rollout.FINISHED:  # its cluster is free again, whichever connector goes next
            self.drive_cluster(ident.connector)
        return {"recorded": True}

    def live(self) -> dict:
        return {"rollouts": self.store.rollouts()}

    def instance_states(self) -> dict[str, str]:
        """What the status page shows per instance in its update column."""
        return instance_states({"progress": self.store.progress_of(), "running": self.store.running()})
