"""Which connector serves which directory, who leads its change feed, where requests go.

Rules (docs/CONTRACTS.md "Directory routing"):

* Connectors serving directory D: those whose newest stored configuration lists
  D in ``config["directories"][*]["id"]``. D's cluster is the cluster of the
  alphabetically first of them (a directory normally lives in one cluster).
* Cluster policy (``tether-home cluster set``): ``failover`` with a primary
  connector (default: the alphabetically first connector of the cluster), or
  ``round-robin``.
* Leader: ONE connected instance per directory follows it and drains changes
  home (two followers would feed the store the same changes twice, out of
  order). failover: an instance of the primary connector whenever one is
  connected (home fails back when it returns), else the first other instance
  by (connector, instance id); a leader keeps leading while no better-ranked
  instance exists. round-robin: sticky, the leader keeps leading while
  connected; a new one is the instance leading the fewest directories.
  Elections run on hello, when the leader's last socket closes, on ``config
  set`` and on ``cluster set``. The new leader gets ``sync follow`` with home's
  stored cursor, the previous one (if still connected) ``sync stop``.
* ``directory.changes`` from the leader are applied (exactly once, see
  :mod:`tether.home.directorystore`); from anyone else dropped with ``leader: false``.
* ``authenticate``/``search``: failover = leader (or primary) first, then the
  others; round-robin = rotate over the instances. Both retried on the next
  instance when a socket drops or an agent answers ``unavailable``.
  ``provision`` goes to exactly one instance and is never retried once sent: a
  socket dropping mid-request gives a result with ``outcome_unknown``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from typing import Protocol

from tether import protocol as p
from tether.home.agentsockets import AgentSocket, ConnectedAgents
from tether.home.directorystore import DirectoryStore, DirectoryStoreError
from tether.home.errors import AgentUnavailable, HomeError, RequestFailed
from tether.home.logs import event
from tether.home.stores import Configurations, Routing

log = logging.getLogger("tether.home.directories")
SYNC_TIMEOUT = 30.0
#: Seconds spooled changes may wait on the leader before `directory status` calls it a stall.
STALL_SECONDS = 20.0
#: Bounds of one heartbeat's flow report (directories, characters per text).
FLOW_MAX_DIRECTORIES = 64
FLOW_TEXT = 400
PROVISION_TIMEOUT = 120.0


class DirectoryTopology(Routing, Configurations, Protocol):
    """What the router reads of home's state: connectors, their clusters' policies and
    the configurations that list the directories."""


def serving_map(store: DirectoryTopology) -> dict[str, list[str]]:
    """directory id -> connectors whose newest configuration lists it (sorted)."""
    serving: dict[str, list[str]] = {}
    for row in store.connectors():
        latest = store.config(row["name"])
        directories = (latest["config"].get("directories") if latest else None) or []
        for item in directories if isinstance(directories, list) else []:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                names = serving.setdefault(item["id"], [])
                if row["name"] not in names:
                    names.append(row["name"])
    return {d: sorted(c) for d, c in serving.items()}


def directory_policy(store: DirectoryTopology, connectors: list[str]) -> dict:
    """The effective cluster policy for a directory served by ``connectors``."""
    clusters = {row["name"]: row["cluster"] for row in store.connectors()}
    cluster = clusters.get(connectors[0]) if connectors else None
    return store.cluster_policy(cluster) if cluster else {
        "name": None, "policy": "failover", "primary": None, "connectors": []}


def check_batch(body: dict) -> list[dict]:
    """A ``directory.changes`` body's entries, or ``bad_type`` saying what is wrong
    (the protocol's one check of a batch, :func:`tether.protocol.changes.check_entries`)."""
    try:
        return p.changes.check_entries(body)
    except p.ProtocolError as exc:
        raise HomeError(p.ErrorCode.BAD_TYPE, exc.detail) from None


def refusal_error(exc: RequestFailed) -> dict:
    """A refused ``sync`` request as a directory error for ``directory status``.

    Why parse: the agent's detail is the engine's error as JSON (code, message,
    hint); anything else (an agent without the directory...) keeps the
    protocol's code, so the operator still sees who refused and why.
    """
    try:
        detail = json.loads(exc.detail)
    except (TypeError, ValueError):
        detail = None
    if isinstance(detail, dict) and isinstance(detail.get("code"), str) \
            and isinstance(detail.get("message"), str):
        return detail
    return {"code": exc.code.value, "message": str(exc.detail),
            "hint": "check that the connector's configuration lists this directory "
                    "(`tether-home config show <connector>`) and that the agent applied it"}


class DirectoryRouter:
    """Leaders, change intake and request routing for every configured directory."""

    def __init__(self, hub: ConnectedAgents, store: DirectoryTopology,
                 directory_store: DirectoryStore) -> None:
        #: the connected sockets and "ask these agents" (the hub; only that part of it)
        self.hub = hub
        self.store = store
        self.directory_store = directory_store
        #: directory -> instance id of its leader
        self.leaders: dict[str, str] = {}
        #: directory -> instances that answered ``sync follow`` with an error (not
        #: elected again until they reconnect or the configuration changes)
        self.refused: dict[str, set[str]] = {}
        #: directory -> last sync request outcome, for ``directory status``
        self.last_sync: dict[str, dict] = {}
        self._serving: dict[str, list[str]] | None = None
        self._policies: dict[str, dict] = {}
        self._rotation: dict[str, itertools.count] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        #: instance -> directory -> its last flow report (heartbeat), with "at"
        self.flows: dict[str, dict[str, dict]] = {}

    # ------------------------------------------------------------ topology

    def serving(self) -> dict[str, list[str]]:
        if self._serving is None:
            self._serving = serving_map(self.store)
        return self._serving

    def refresh(self) -> None:
        """Forget cached configuration (after ``config set`` / ``cluster set``)."""
        self._serving = None
        self._policies = {}

    def policy(self, directory: str) -> dict:
        """The directory's cluster policy, cached like :meth:`serving`.

        Why cached: every authenticate and search asks for it (twice), and reading
        it costs two queries of home.sqlite3 on the event loop; it changes only
        through ``config set`` / ``cluster set`` / ``connector set --cluster``,
        which all end in :meth:`refresh`.
        """
        found = self._policies.get(directory)
        if found is None:
            found = directory_policy(self.store, self.serving().get(directory, []))
            self._policies[directory] = found
        return found

    def _instances(self, directory: str) -> dict[str, list[AgentSocket]]:
        """Connected instances serving ``directory`` -> their open sockets (non-draining
        first), ordered by (connector, instance id)."""
        found: dict[tuple[str, str], list[AgentSocket]] = {}
        for connector in self.serving().get(directory, []):
            for peer in self.hub.agents(connector):
                if peer.ws.close_code is None and peer.identity.instance_id:
                    found.setdefault((connector, peer.identity.instance_id), []).append(peer)
        return {iid: sorted(peers, key=lambda pe: pe.draining)
                for (_, iid), peers in sorted(found.items())}

    def _connector_of(self, instances: dict[str, list[AgentSocket]], iid: str) -> str:
        return instances[iid][0].identity.connector

    def _ranked(self, directory: str, instances: dict[str, list[AgentSocket]]) -> list[str]:
        """Instance ids in policy order (failover: primary's first)."""
        order = list(instances)
        policy = self.policy(directory)
        if policy["policy"] == "failover":
            order.sort(key=lambda iid: self._connector_of(instances, iid) != policy["primary"])
        return order

    # ------------------------------------------------------------ leaders

    def elect_all(self) -> None:
        for directory in sorted(set(self.serving()) | set(self.leaders)):
            self.elect(directory)

    def elect(self, directory: str) -> str | None:
        """(Re)choose the leader now; notifications go out in the background, in order."""
        old = self.leaders.get(directory)
        instances = self._instances(directory)
        refused = self.refused.get(directory, set())
        ranked = [iid for iid in self._ranked(directory, instances) if iid not in refused]
        policy = self.policy(directory)
        new: str | None = None
        if ranked and policy["policy"] == "failover":
            def rank(iid: str) -> bool:
                return self._connector_of(instances, iid) != policy["primary"]
            new = old if old in ranked and rank(old) == rank(ranked[0]) else ranked[0]
        elif ranked:
            load = {iid: 0 for iid in ranked}
            for d, iid in self.leaders.items():
                if iid in load and d != directory:
                    load[iid] += 1
            new = old if old in ranked else min(ranked, key=lambda iid: load[iid])
        if new == old:
            return new
        if new is None:
            self.leaders.pop(directory, None)
        else:
            self.leaders[directory] = new
        event(log, logging.INFO, "directory_leader", directory=directory, leader=new,
              previous=old, policy=policy["policy"], primary=policy.get("primary"))
        self._spawn(self._notify(directory, old, new))
        return new

    async def _notify(self, directory: str, old: str | None, new: str | None) -> None:
        async with self._locks.setdefault(directory, asyncio.Lock()):
            if new is not None and self.leaders.get(directory) == new:
                await self._sync(directory, new, {"directory": directory, "mode": "follow",
                                                  "cursor": self.directory_store.cursor(directory)})
            if old is not None and old != self.leaders.get(directory):
                await self._sync(directory, old, {"directory": directory, "mode": "stop"})

    async def _sync(self, directory: str, iid: str, body: dict) -> None:
        peer = self._socket(iid)
        if peer is None:
            return
        outcome = {"instance": iid, "mode": body["mode"], "at": time.time()}
        try:
            response = await peer.request(p.Op.SYNC, body, SYNC_TIMEOUT)
            outcome.update(ok=True, response=response.body)
        except RequestFailed as exc:
            outcome.update(ok=False, code=exc.code.value, detail=exc.detail)
            if body["mode"] != "stop":
                self.directory_store.record_error(directory, iid, refusal_error(exc))
                # It cannot lead this directory (configuration not applied, bad bind
                # password...): let another instance lead until it reconnects.
                self.refused.setdefault(directory, set()).add(iid)
                if self.leaders.get(directory) == iid:
                    self.elect(directory)
        except AgentUnavailable as exc:  # socket gone: its detach re-elects
            outcome.update(ok=False, code=exc.code.value, detail=exc.detail)
        self.last_sync[directory] = outcome
        event(log, logging.INFO if outcome["ok"] else logging.WARNING, "directory_sync",
              directory=directory, instance=iid, mode=body["mode"], ok=outcome["ok"],
              code=outcome.get("code"), detail=outcome.get("detail"))

    def _socket(self, iid: str) -> AgentSocket | None:
        peers = [pe for pe in self.hub.peers.values()
                 if pe.identity.instance_id == iid and pe.session.established
                 and pe.ws.close_code is None]
        peers.sort(key=lambda pe: pe.draining)
        return peers[0] if peers else None

    def on_hello(self, peer: AgentSocket) -> None:
        """A (re)connected instance may be the better leader, or the first one."""
        iid = peer.identity.instance_id
        for refused in self.refused.values():
            refused.discard(iid)
        self.refresh()
        self.elect_all()

    def on_detach(self, peer: AgentSocket) -> None:
        """Re-elect when a leader's last socket closed."""
        iid = peer.identity.instance_id
        if iid is None or self._socket(iid) is not None:
            return
        for directory, leader in list(self.leaders.items()):
            if leader == iid:
                self.elect(directory)

    def on_config_applied(self, iid: str) -> None:
        """An instance runs a new configuration: give it another chance to lead."""
        for refused in self.refused.values():
            refused.discard(iid)
        self.elect_all()

    def on_flow(self, iid: str, report: dict) -> None:
        """Keep an instance's per-directory flow report (heartbeat), bounded."""
        flows = {}
        for directory, item in list(report.items())[:FLOW_MAX_DIRECTORIES]:
            if isinstance(directory, str) and isinstance(item, dict):
                flows[directory[:200]] = clean_flow(item)
        self.flows[iid] = flows

    def on_config_changed(self) -> None:
        self.refresh()
        self.refused.clear()
        self.elect_all()

    # ------------------------------------------------------------ changes

    def handle_changes(self, peer: AgentSocket, body: dict) -> dict:
        """Apply a batch from the leader; acknowledge and drop one from anyone else."""
        entries = check_batch(body)
        directory, iid = body["directory"], peer.identity.instance_id
        leader = self.leaders.get(directory)
        if leader is None and directory in self.serving():
            leader = self.elect(directory)
        if iid != leader:
            top = entries[-1]["seq"] if entries else self.directory_store.applied_through(directory, iid)
            if entries:
                self.directory_store.record_dropped(directory, iid, top)
            event(log, logging.INFO, "directory_changes_dropped", directory=directory,
                  instance=iid, leader=leader, entries=len(entries), through=top)
            return {"applied_through": top, "leader": False}
        after = body.get("after")
        try:
            result = self.directory_store.apply_batch(directory, iid, entries, after)
        except DirectoryStoreError as exc:
            # The agent retries this batch forever: say so in `directory status` now.
            self.directory_store.record_error(directory, iid, {
                "code": "changes_refused", "message": f"home refused a batch of changes: {exc}",
                "hint": "changes of this directory stop here: fix the entry named above at its "
                        "source (the agent retries the batch until home accepts it)",
                "at": time.time()})
            raise HomeError(p.ErrorCode.BAD_TYPE, f"{exc}; nothing of this batch was applied "
                            "(fix the record at its source, or let the agent run a full "
                            "sync)") from None
        if result.out_of_order:
            event(log, logging.WARNING, "directory_changes_out_of_order", directory=directory,
                  instance=iid, after=after, applied_through=result.applied_through,
                  entries=len(entries))
        if result.resync_wanted:
            event(log, logging.WARNING, "directory_resync", directory=directory, instance=iid,
                  reason="; ".join(result.notes))
            self._spawn(self._resync(directory, iid))
        if result.applied:
            self.flows.get(iid, {}).pop(directory, None)  # it flows: the last report is stale
            event(log, logging.DEBUG, "directory_changes", directory=directory, instance=iid,
                  applied=result.applied, skipped=result.skipped, records=result.records,
                  through=result.applied_through, swapped=result.swapped)
        return {"applied_through": result.applied_through, "leader": True}

    async def _resync(self, directory: str, iid: str) -> None:
        async with self._locks.setdefault(directory, asyncio.Lock()):
            if self.leaders.get(directory) == iid:
                await self._sync(directory, iid, {"directory": directory, "mode": "full",
                                                  "cursor": None})

    # ------------------------------------------------------------ requests

    def candidates(self, directory: str, *, rotate: bool = True) -> list[AgentSocket]:
        """Sockets to try for a request about ``directory``, in policy order."""
        serving = self.serving().get(directory)
        if not serving:
            self.refresh()  # a config set while this process cached the old one
            serving = self.serving().get(directory)
        if not serving:
            raise HomeError(p.ErrorCode.NOT_FOUND,
                            f"no connector's configuration names directory {directory!r}; "
                            "add it to a connector with `tether-home config set`")
        instances = self._instances(directory)
        if not instances:
            raise AgentUnavailable(f"no connector serving directory {directory!r} is "
                                   f"connected ({', '.join(serving)}); start or reconnect "
                                   "one of its appliances")
        order = self._ranked(directory, instances)
        policy = self.policy(directory)
        if policy["policy"] == "failover":
            leader = self.leaders.get(directory)

            def rank(iid: str) -> bool:
                return self._connector_of(instances, iid) != policy["primary"]
            if leader in order and rank(leader) == rank(order[0]):
                order.remove(leader)
                order.insert(0, leader)
        elif rotate:
            start = next(self._rotation.setdefault(directory, itertools.count())) % len(order)
            order = order[start:] + order[:start]
        return [pe for iid in order for pe in instances[iid]]

    async def authenticate(self, directory: str, username: str, password: str,
                           timeout: float = 30.0, groups: bool = True) -> dict:
        body = {"directory": directory, "username": username, "password": password}
        if not groups:
            body["groups"] = False  # only when asked: the default needs no newer agent
        response = await self.hub.request(None, p.Op.AUTHENTICATE, body, timeout,
                                          peers=self.candidates(directory))
        return response.body

    async def search(self, directory: str, kind: str, flt: str, limit: int | None = None,
                     timeout: float = 60.0) -> dict:
        body: dict = {"directory": directory, "kind": kind, "filter": flt}
        if limit is not None:
            body["limit"] = limit
        chunks: list[p.Message] = []
        response = await self.hub.request(None, p.Op.SEARCH, body, timeout,
                                          peers=self.candidates(directory), chunks=chunks)
        entries = [e for chunk in chunks for e in chunk.body.get("entries", [])]
        if isinstance(response.body.get("entries"), list):  # an agent that does not stream
            entries.extend(response.body["entries"])
        return {"entries": entries, "truncated": bool(response.body.get("truncated"))}

    async def provision(self, directory: str, order: dict,
                        timeout: float = PROVISION_TIMEOUT) -> dict:
        """One instance, one attempt: a write is never repeated elsewhere."""
        peer = next((pe for pe in self.candidates(directory) if pe.ws.close_code is None), None)
        if peer is None:
            raise AgentUnavailable(f"no open socket serves directory {directory!r}")
        try:
            response = await self.hub.request(None, p.Op.PROVISION,
                                              {"directory": directory, "order": order},
                                              timeout, peers=[peer], failover=False)
        except AgentUnavailable as exc:
            event(log, logging.WARNING, "provision_outcome_unknown", directory=directory,
                  order=order.get("id"), instance=peer.identity.instance_id, detail=exc.detail)
            return {"ok": False, "instance": peer.identity.instance_id, "result": {
                "id": order.get("id"), "op": order.get("op"), "status": "failed",
                "code": "outcome_unknown", "outcome_unknown": True,
                "reason": f"{exc.detail}; the order was sent, so it may or may not have been "
                          "carried out: check the directory (or search) before re-sending"}}
        return {**response.body, "instance": peer.identity.instance_id}

    # ------------------------------------------------------------ status

    def live(self) -> dict:
        """What only the running server knows, per directory."""
        out = {}
        for directory in sorted(set(self.serving()) | set(self.leaders)):
            out[directory] = {"leader": self.leaders.get(directory),
                              "connected_instances": list(self._instances(directory)),
                              "refused": sorted(self.refused.get(directory, ())),
                              "last_sync": self.last_sync.get(directory),
                              "flow": self.flows.get(self.leaders.get(directory) or "", {})
                              .get(directory)}
        return out

    # ------------------------------------------------------------ plumbing

    def _spawn(self, coro) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (shutdown): nothing to notify
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def clean_flow(item: dict) -> dict:
    """One directory's flow report from a heartbeat, with only known, bounded fields."""
    def num(value) -> float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and value >= 0 else 0.0
    error = item.get("error")
    clean = {"pending": int(num(item.get("pending"))), "waiting_s": num(item.get("waiting_s")),
             "following": item.get("following") is True, "at": time.time(), "error": None}
    if isinstance(error, dict):
        clean["error"] = {k: str(error[k])[:FLOW_TEXT] for k in ("code", "message", "hint")
                          if isinstance(error.get(k), str)}
    return clean


def stall(connectors: list[str], running: dict | None, error: dict | None) -> dict | None:
    """Why changes of a directory do not flow now, with what to do (None: they flow).

    Why computed here: each cause is seen by a different party (home's store
    refused a batch; the leader's spool grows; its follower cannot reach the
    directory or write its spool; no appliance is connected), and the operator
    needs one line that says which.
    """
    if error and error.get("code") == "changes_refused":
        return {"reason": error["message"], "hint": error.get("hint"), "since": error.get("at")}
    if running is None:
        return None  # server not running: leaders and flows are unknown
    if connectors and not running.get("connected_instances"):
        return {"reason": "no appliance serving this directory is connected, so no change "
                          "reaches home", "since": None,
                "hint": f"start or reconnect an appliance of {', '.join(connectors)}"}
    flow = running.get("flow") or {}
    waiting = flow.get("waiting_s", 0.0) + max(0.0, time.time() - flow.get("at", time.time()))
    failure = flow.get("error") or {}
    if failure:
        return {"reason": f"the leader cannot move changes: {failure.get('code')}: "
                          f"{failure.get('message')}", "hint": failure.get("hint"),
                "since": None, "pending": flow.get("pending", 0)}
    if flow.get("pending") and waiting >= STALL_SECONDS:
        return {"reason": f"{flow['pending']} spooled changes have waited {waiting:.0f} s on the "
                          f"leader {running.get('leader')} without home applying them",
                "hint": "check the leader's link to home and the agent's journal; the changes "
                        "are kept and flow again by themselves once home acknowledges them",
                "since": time.time() - waiting, "pending": flow["pending"]}
    return None


def report(store: DirectoryTopology, directory_store: DirectoryStore | None,
           live: dict | None) -> list[dict]:
    """``directory status``: per directory its connectors, policy, leader (server
    running), cursor, counts, applied_through per instance, last change."""
    serving = serving_map(store)
    names = set(serving) | set(directory_store.directories() if directory_store else []) | set(live or {})
    rows = []
    for directory in sorted(names):
        connectors = serving.get(directory, [])
        policy = directory_policy(store, connectors)
        state = directory_store.status(directory) if directory_store else {}
        running = (live or {}).get(directory, {})
        rows.append({
            "directory": directory, "connectors": connectors, "cluster": policy["name"],
            "policy": policy["policy"], "primary": policy["primary"],
            "leader": running.get("leader"),
            "connected_instances": running.get("connected_instances"),
            "last_sync": running.get("last_sync"),
            "cursor": state.get("cursor"), "users": state.get("users", 0),
            "groups": state.get("groups", 0), "staging": state.get("staging", 0),
            "stream_open": state.get("stream_mode"),
            "applied_through": state.get("applied_through", {}),
            "last_change": state.get("last_change"), "synced_at": state.get("synced_at"),
            "full_synced_at": state.get("full_synced_at"),
            "error": state.get("error"),
            "stall": stall(connectors, running if live is not None else None, state.get("error")),
            # issue 12: data that could not be carried as is, each with its entry
            "problems": state.get("problems") or {"entries": 0, "items": []},
            "unresolved_members": state.get("unresolved_members") or {"count": 0, "examples": []},
            "member_loops": state.get("member_loops") or [],
        })
    return rows


def render(rows: list[dict], running: bool) -> str:
    """Text view of :func:`report`."""
    if not rows:
        return "no directories: list them in a connector's configuration (`config set`)"
    lines = [] if running else ["server: not running (leaders unknown)"]
    for r in rows:
        changed = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_change"])) \
            if r["last_change"] else "never"
        primary = f" primary={r['primary']}" if r["policy"] == "failover" else ""
        lines.append(f"{r['directory']}  cluster={r['cluster'] or '-'} policy={r['policy']}"
                     f"{primary} connectors={','.join(r['connectors']) or '-'}")
        lines.append(f"    leader={r['leader'] or '-'} users={r['users']} groups={r['groups']} "
                     f"cursor={r['cursor'] or '-'} last_change={changed}"
                     f"{' (stream open: ' + r['stream_open'] + ')' if r['stream_open'] else ''}")
        for iid, seq in r["applied_through"].items():
            lines.append(f"    applied_through {iid}: {seq}")
        if r.get("error"):
            lines.append(f"    {error_line(r['error'])}")
        if r.get("stall"):
            hint = f" ({r['stall']['hint']})" if r["stall"].get("hint") else ""
            lines.append(f"    stalled: {r['stall']['reason']}{hint}")
        lines += data_lines(r)
    return "\n".join(lines)


def data_lines(row: dict) -> list[str]:
    """Problems of the synced data (issue 12), each with the entry it came from."""
    lines = []
    problems = row.get("problems") or {}
    if problems.get("entries"):
        lines.append(f"    problems: {problems['entries']} entries (fix them in the directory; "
                     "the rest syncs)")
        lines += [f"      {p['code']}: {p['dn']}: {p['message']}" for p in problems["items"]]
    unresolved = row.get("unresolved_members") or {}
    if unresolved.get("count"):
        lines.append(f"    unresolved members: {unresolved['count']} member DNs name no synced "
                     "entry (kept; outside the base DNs, or gone)")
        lines += [f"      {u['group']} lists {u['member']}" for u in unresolved["examples"]]
    for loop in row.get("member_loops") or []:
        lines.append("    member loop: " + " -> ".join(g["dn"] for g in loop + loop[:1]))
    return lines


def error_line(error: dict) -> str:
    """``error: <code>: <message> (hint)`` plus where it came from, for the text view."""
    hint = f" ({error['hint']})" if error.get("hint") else ""
    source = [f"server {error['server']}"] if error.get("server") else []
    source += [f"instance {error['instance']}"] if error.get("instance") else []
    if error.get("at"):
        source.append(time.strftime("at %Y-%m-%d %H:%M:%S", time.localtime(error["at"])))
    where = f" [{', '.join(source)}]" if source else ""
    return f"error: {error['code']}: {error['message']}{hint}{where}"
