"""The running home: connected agents, what they may do, and the in-process API.

:class:`Hub` owns the database handle and every :class:`AgentPeer`. It answers
agent requests (hello, enroll, renew, status), records heartbeats (batched: one
transaction every :data:`FLUSH_SECONDS`, so thousands of agents cost little),
pushes signed configuration, and gives the rest of home (the directory work)
:meth:`Hub.request` / :meth:`Hub.stream`: "ask some connected agent of
connector X", round-robin over its instance sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator

from tether import __version__, configsig, sealing
from tether import protocol as p
from tether.home import enroll
from tether.home.directories import DirectoryRouter
from tether.home.errors import AgentUnavailable, HomeError, RequestFailed
from tether.home.identity import IdentityStore
from tether.home.logs import event
from tether.home.peer import AgentPeer
from tether.home.store import Store

log = logging.getLogger("tether.home.hub")
FLUSH_SECONDS = 5.0
#: Read-only operations that may be retried on another instance of the connector.
FAILOVER_OPS = frozenset({p.Op.AUTHENTICATE, p.Op.SEARCH, p.Op.STATUS})
#: Agents may report a handful of sockets; more is a bug or an attack.
MAX_LISTENING = 256
#: Largest self-check report home stores (JSON bytes); a report is a few hundred.
MAX_SELFCHECK_BYTES = 64 * 1024


def _report_size_ok(report) -> bool:
    """Self-check reports go to the database on every heartbeat: keep them small."""
    return len(json.dumps(report, default=str)) <= MAX_SELFCHECK_BYTES


class Hub:
    """Registry of connected agents and the handlers of their requests."""

    def __init__(self, store: Store, authority: enroll.Authority, config_key,
                 identity: IdentityStore | None = None) -> None:
        self.store = store
        self.authority = authority
        self.config_key = config_key
        self.started = time.time()
        self.peers: dict[str, AgentPeer] = {}
        self._by_connector: dict[str, list[AgentPeer]] = {}
        self._round_robin: dict[str, itertools.count] = {}
        self._beats: dict[str, dict] = {}
        self._push_locks: dict[str, asyncio.Lock] = {}
        self._flusher: asyncio.Task | None = None
        #: Directory service (issue 5): leaders, change intake, request routing.
        self.directories = DirectoryRouter(self, identity) if identity is not None else None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.store.clear_sockets()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def stop(self) -> None:
        if self._flusher:
            self._flusher.cancel()
        if self.directories is not None:
            await self.directories.stop()
        self.flush_heartbeats()
        self.store.clear_sockets()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                self.flush_heartbeats()
            except Exception:
                log.exception("heartbeat flush failed")

    def flush_heartbeats(self) -> None:
        beats, self._beats = self._beats, {}
        self.store.record_heartbeats(beats)

    def sockets_of(self, identity) -> int:
        """Open sockets of the same enrolled instance."""
        return sum(1 for pe in self.peers.values()
                   if pe.identity.instance_id == identity.instance_id)

    def attach(self, peer: AgentPeer) -> None:
        self.peers[peer.socket_id] = peer

    def detach(self, peer: AgentPeer) -> None:
        self.peers.pop(peer.socket_id, None)
        group = self._by_connector.get(peer.identity.connector, [])
        if peer in group:
            group.remove(peer)
        if peer.hello is not None:
            self.store.remove_socket(peer.socket_id)
            if peer.identity.instance_id:
                self._beats.setdefault(peer.identity.instance_id, {})["at"] = time.time()
            if self.directories is not None and peer.identity.role == "instance":
                self.directories.on_detach(peer)

    # --------------------------------------------------------- agent → home

    async def handle_request(self, peer: AgentPeer, message: p.Message) -> dict:
        """The response body for an agent's request, or :class:`HomeError`."""
        op, ident = message.op, peer.identity
        if op is p.Op.HELLO:
            return self._hello(peer, message.body)
        if ident.role == "image" and op is not p.Op.ENROLL:
            raise HomeError(p.ErrorCode.UNAUTHORIZED,
                            f"an image credential may only enroll, not {op.value}")
        if op is p.Op.ENROLL:
            response = enroll.enroll(self.store, self.authority, ident, message.body)
        elif op is p.Op.RENEW:
            response = enroll.renew(self.store, self.authority, ident, message.body)
        elif op is p.Op.STATUS:
            return self._status_for(peer)
        elif op is p.Op.DIRECTORY_CHANGES:
            if self.directories is None:
                raise HomeError(p.ErrorCode.UNAVAILABLE, "this home keeps no identity store")
            return self.directories.handle_changes(peer, message.body)
        else:  # the session refuses other ops already; keep a clear answer anyway
            raise HomeError(p.ErrorCode.WRONG_DIRECTION, f"home does not serve {op.value}")
        response.pop("serial", None)
        return response

    def _hello(self, peer: AgentPeer, body: dict) -> dict:
        ident = peer.identity
        if body["image_id"] != ident.image_id:
            raise HomeError(p.ErrorCode.UNAUTHORIZED,
                            f"hello names image {body['image_id']} but the certificate "
                            f"belongs to image {ident.image_id}")
        if ident.role == "instance" and body.get("instance_id") not in (None, ident.instance_id):
            raise HomeError(p.ErrorCode.UNAUTHORIZED,
                            "hello names another instance than the certificate")
        listening = body.get("listening")
        if listening is not None and len(listening) > MAX_LISTENING:
            raise HomeError(p.ErrorCode.BAD_TYPE, f"listening: at most {MAX_LISTENING} entries")
        if not _report_size_ok(body.get("selfcheck")):
            raise HomeError(p.ErrorCode.BAD_TYPE,
                            f"selfcheck report above {MAX_SELFCHECK_BYTES} bytes; send figures "
                            "and shortfalls only")
        peer.hello = body
        index = body.get("socket_index")
        self.store.add_socket(peer.socket_id, ident.role, ident.connector, ident.image_id,
                              ident.instance_id, peer.peer, index)
        latest = self.store.config(ident.connector)
        if ident.role == "instance":
            self.store.record_hello(ident.instance_id, body["agent_version"],
                                    body.get("selfcheck"), listening, body.get("config_version"))
            self._by_connector.setdefault(ident.connector, []).append(peer)
        verdict = (body.get("selfcheck") or {}).get("verdict")
        event(log, logging.INFO, "hello", peer=peer.peer, role=ident.role,
              connector=ident.connector, instance=ident.instance_id, image=ident.image_id,
              agent_version=body["agent_version"], socket_index=index, selfcheck=verdict,
              listening=len(listening or []), config_version=body.get("config_version"))
        return {"home_version": __version__, "server_time": time.time(), "role": ident.role,
                "connector": ident.connector, "instance_id": ident.instance_id,
                "heartbeat_seconds": p.HEARTBEAT_SECONDS,
                "config_version": latest["version"] if latest else None,
                "config_key_pem": self.authority.config_key_pem}

    async def after_hello(self, peer: AgentPeer) -> None:
        """Push the newest configuration if the agent runs an older one."""
        if peer.identity.role != "instance":
            return
        latest = self.store.config(peer.identity.connector)
        running = (peer.hello or {}).get("config_version")
        if latest and (running is None or running < latest["version"]):
            await self.push_config(peer)
        if self.directories is not None and peer.session.established \
                and peer.ws.close_code is None:
            self.directories.on_hello(peer)

    def _status_for(self, peer: AgentPeer) -> dict:
        row = self.store.instance(peer.identity.instance_id) if peer.identity.instance_id else None
        latest = self.store.config(peer.identity.connector)
        return {"server_time": time.time(), "home_version": __version__,
                "instance_id": peer.identity.instance_id,
                "cert_not_after": row["cert_not_after"] if row else None,
                "config_version": latest["version"] if latest else None}

    def on_event(self, peer: AgentPeer, message: p.Message) -> None:
        """Heartbeats are batched; config acks are written at once."""
        iid = peer.identity.instance_id
        if iid is None:
            return
        body = message.body
        if message.op is p.Op.HEARTBEAT:
            if body.get("draining"):
                peer.draining = True
            beat = self._beats.setdefault(iid, {})
            beat["at"] = time.time()
            if "selfcheck" in body and _report_size_ok(body["selfcheck"]):
                beat["selfcheck"] = body["selfcheck"]
            if self.directories is not None and isinstance(body.get("directories"), dict):
                self.directories.on_flow(iid, body["directories"])
            listening = body.get("listening")
            if listening is not None and len(listening) <= MAX_LISTENING:
                beat["listening"] = listening
        elif message.op is p.Op.CONFIG_ACK:
            status = f"{body['status']}:{body['error']}" if body.get("error") else body["status"]
            self.store.record_config_state(iid, body.get("version"), status)
            if self.directories is not None and body["status"] == "applied":
                self.directories.on_config_applied(iid)  # it may now serve new directories
            event(log, logging.INFO if body["status"] != "rejected" else logging.WARNING,
                  "config_ack", instance=iid, version=body.get("version"), status=body["status"],
                  error=body.get("error"), detail=body.get("detail"))

    # --------------------------------------------------------- configuration

    def signed_config_for(self, instance_id: str, connector: str) -> tuple[int, dict] | None:
        """The newest configuration, secrets sealed to this instance, signed."""
        latest = self.store.config(connector)
        if latest is None:
            return None
        row = self.store.instance(instance_id)
        key = row["sealing_public_key"]
        sealed = configsig.seal_secrets(latest["config"],
                                        lambda plain, aad: sealing.seal(key, plain, aad))
        document = configsig.sign_config(self.config_key, sealed, version=latest["version"],
                                         connector=connector, instance_id=instance_id)
        return latest["version"], document

    async def push_config(self, peer: AgentPeer) -> bool:
        """Send the newest configuration to one socket; True when applied.

        Pushes to one instance are serialized, and skipped when the instance
        already acknowledged this version (its second socket's hello, say).
        """
        iid = peer.identity.instance_id
        lock = self._push_locks.setdefault(iid, asyncio.Lock())
        async with lock:
            made = self.signed_config_for(iid, peer.identity.connector)
            if made is None:
                return False
            version, document = made
            row = self.store.instance(iid)
            applied = row and row["config_status"] == "applied"
            if applied and (row["config_version"] or 0) >= version:
                return True
            try:
                response = await peer.request(p.Op.CONFIG_PUSH, {"config": document})
            except (RequestFailed, AgentUnavailable) as exc:
                outcome = "rejected" if isinstance(exc, RequestFailed) else "undelivered"
                self.store.record_config_state(iid, None, f"{outcome}:{exc.code.value}")
                event(log, logging.WARNING, "config_push_failed", instance=iid, version=version,
                      code=exc.code.value, detail=exc.detail)
                return False
            applied = bool(response.body.get("applied"))
            self.store.record_config_state(iid, response.body.get("version"),
                                           "applied" if applied else "received")
            event(log, logging.INFO, "config_pushed", instance=iid, version=version,
                  applied=applied)
            return applied

    async def push_config_to_connector(self, connector: str) -> int:
        """After ``config set``: push to one socket of every connected instance."""
        chosen: dict[str, AgentPeer] = {}
        peers = self._by_connector.get(connector, [])
        for peer in sorted(peers, key=lambda pe: pe.draining):  # sockets staying open first
            chosen.setdefault(peer.identity.instance_id, peer)
        results = await asyncio.gather(*(self.push_config(pe) for pe in chosen.values()),
                                       return_exceptions=True)
        return sum(1 for r in results if r is True)

    async def drop_serial(self, serial: str) -> int:
        """After ``revoke``: close sockets that authenticated with that certificate."""
        victims = [pe for pe in self.peers.values() if pe.identity.serial == serial]
        for peer in victims:
            event(log, logging.WARNING, "revoked_socket_closed", peer=peer.peer, serial=serial)
            await peer.ws.close(1008, "certificate revoked")
        return len(victims)

    # ------------------------------------------------------ in-process API

    def agents(self, connector: str | None = None, *,
               cluster: str | None = None) -> list[AgentPeer]:
        """Established instance sockets of a connector, or of every connector in a cluster."""
        if cluster is not None:
            names = [row["name"] for row in self.store.connectors() if row["cluster"] == cluster]
        else:
            names = [connector]
        return [pe for name in names for pe in self._by_connector.get(name, [])
                if pe.session.established]

    def _candidates(self, connector: str | None, cluster: str | None) -> list[AgentPeer]:
        """Sockets to try in order: round-robin over the ones not draining, then the
        draining ones (they still answer, but are about to close)."""
        key = f"cluster:{cluster}" if cluster is not None else str(connector)
        group = self.agents(connector, cluster=cluster)
        if not group:
            raise AgentUnavailable(f"no agent of {key.replace(':', ' ')} is connected")
        start = next(self._round_robin.setdefault(key, itertools.count())) % len(group)
        rotated = group[start:] + group[:start]
        return [pe for pe in rotated if not pe.draining] + [pe for pe in rotated if pe.draining]

    def _pick(self, connector: str | None, cluster: str | None = None) -> AgentPeer:
        return self._candidates(connector, cluster)[0]

    async def request(self, connector: str | None, op: p.Op, body: dict, timeout: float = 30.0,
                      *, cluster: str | None = None, failover: bool | None = None,
                      peers: list[AgentPeer] | None = None,
                      chunks: list[p.Message] | None = None) -> p.Message:
        """Send ``op`` to a connected agent of ``connector`` (or of ``cluster``, or to
        the explicit ``peers`` in the order given: the directory router's choice).

        Round-robin over sockets, skipping sockets being rotated out. With
        failover (default for the read-only ops in :data:`FAILOVER_OPS`), a
        socket that closes or times out is replaced by the next one, and an
        instance that answers ``unavailable`` (its directory is unreachable) by
        the next instance, so one dead appliance goes unnoticed. Without
        failover exactly one attempt is made (on the first open socket).

        ``chunks``: for streamed ops, a list that receives the chunk messages of
        the attempt that succeeded (the final response is returned).
        """
        op = p.Op(op)
        failover = op in FAILOVER_OPS if failover is None else failover
        candidates = list(peers) if peers is not None else self._candidates(connector, cluster)
        if not candidates:
            raise AgentUnavailable(f"no agent to send {op.value} to is connected")
        last: HomeError | None = None
        given_up: set[str | None] = set()
        for peer in candidates:
            if peer.identity.instance_id in given_up or peer.ws.close_code is not None:
                continue
            try:
                return await self._ask(peer, op, body, timeout, chunks)
            except (AgentUnavailable, RequestFailed) as exc:
                if exc.code is not p.ErrorCode.UNAVAILABLE or not failover:
                    raise  # the agent answered (wrong password, bad request...) or a write
                if isinstance(exc, RequestFailed):
                    given_up.add(peer.identity.instance_id)
                last = exc
                event(log, logging.WARNING, "failover", op=op.value, peer=peer.peer,
                      instance=peer.identity.instance_id, code=exc.code.value, detail=exc.detail)
        who = connector or cluster or "the chosen agents"
        raise last or AgentUnavailable(f"every socket of {who} closed")

    @staticmethod
    async def _ask(peer: AgentPeer, op: p.Op, body: dict, timeout: float,
                   chunks: list[p.Message] | None) -> p.Message:
        """One attempt on one socket; a streamed op's chunks are collected."""
        if chunks is None or op not in p.STREAM_OPS:
            return await peer.request(op, body, timeout)
        chunks.clear()
        async with contextlib.aclosing(peer.stream(op, body, timeout)) as stream:
            async for message in stream:
                if message.kind is p.Kind.CHUNK:
                    chunks.append(message)
                else:
                    return message
        raise AgentUnavailable(f"{op.value} stream from {peer.peer} ended without a response")

    async def stream(self, connector: str | None, op: p.Op, body: dict, timeout: float = 30.0,
                     *, cluster: str | None = None) -> AsyncIterator[p.Message]:
        """Streamed request: yields chunk messages, then the final response.

        No automatic failover: a broken stream resumes with a new request from
        the last acknowledged cursor (the caller keeps it).
        """
        peer = self._pick(connector, cluster)
        async with contextlib.aclosing(peer.stream(p.Op(op), body, timeout)) as stream:
            async for message in stream:
                yield message

    def live(self) -> dict:
        """Figures only the running server knows (for ``status``)."""
        by_role: dict[str, int] = {}
        for peer in self.peers.values():
            by_role[peer.identity.role] = by_role.get(peer.identity.role, 0) + 1
        doc = {"uptime": time.time() - self.started, "sockets": len(self.peers),
               "sockets_by_role": by_role, "pending_heartbeats": len(self._beats)}
        if self.directories is not None:
            doc["directories"] = self.directories.live()
        return doc
