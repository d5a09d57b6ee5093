"""The running home: connected agents, what they may do, and the in-process API.

:class:`Hub` owns the database handle and every agent socket (an
:class:`~tether.home.agentsockets.AgentSocket`, made by the server). It answers
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

from websockets.exceptions import ConnectionClosed

from tether import __version__, configsig, sealing
from tether import protocol as p
from tether.home import enroll
from tether.home.agentsockets import AgentSocket
from tether.home.bookkeeping import Bookkeeping
from tether.home.directories import DirectoryRouter
from tether.home.errors import AgentUnavailable, HomeError, RequestFailed
from tether.home.directorystore import DirectoryStore
from tether.home.logs import event
from tether.home.store import Store

log = logging.getLogger("tether.home.hub")
FLUSH_SECONDS = 5.0
#: Read-only operations that may be retried on another instance of the connector.
FAILOVER_OPS = frozenset({p.Op.AUTHENTICATE, p.Op.SEARCH, p.Op.STATUS})
#: Agents may report a handful of sockets; more is a bug or an attack.
MAX_LISTENING = 256
#: Largest self-check report home stores (JSON bytes); a report is a few hundred.
MAX_SELFCHECK_BYTES = 64 * 1024
#: How long home waits for an agent to answer a configuration push. Shorter than the
#: CLI's control timeout, so ``config set`` reports a silent appliance instead of
#: timing out itself.
PUSH_TIMEOUT = 10.0
#: Pushes a ``config.ack`` may trigger on one socket: a genuine agent needs one; a
#: peer repeating a wrong version must not make home sign and seal without end.
MAX_ACK_PUSHES = 2


def _report_size_ok(report) -> bool:
    """Self-check reports go to the database on every heartbeat: keep them small."""
    return len(json.dumps(report, default=str)) <= MAX_SELFCHECK_BYTES


class Hub:
    """Registry of connected agents and the handlers of their requests."""

    def __init__(self, store: Store, authority: enroll.Authority, config_key,
                 directory_store: DirectoryStore | None = None) -> None:
        self.store = store
        self.authority = authority
        self.config_key = config_key
        self.started = time.time()
        self.peers: dict[str, AgentSocket] = {}
        self._by_connector: dict[str, list[AgentSocket]] = {}
        self._round_robin: dict[str, itertools.count] = {}
        self._beats: dict[str, dict] = {}
        self._push_locks: dict[str, asyncio.Lock] = {}
        self._flusher: asyncio.Task | None = None
        #: best-effort record writes (hello, heartbeats, sockets): a full disk keeps no
        #: enrolled instance out
        self.books = Bookkeeping()
        self._unrecorded_closes: set[str] = set()
        self._unrecorded_opens: dict[str, tuple] = {}  # socket id -> add_socket arguments
        #: per socket: the configuration version the agent last said it runs
        #: (hello, ``config.ack``, push response), and pushes its acks triggered
        self._reported: dict[str, int | None] = {}
        self._reports: dict[str, int] = {}  # how many reports each socket made
        self._ack_pushes: dict[str, int] = {}
        #: per instance: versions confirmed while the database could not be written
        self._confirmed: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        #: Enrolment, renewal and clone-record rates (issue 11); exceeded = socket closed.
        self.enrol_limits = enroll.Limits()
        self._closing: set[asyncio.Task] = set()
        self._closing_ids: set[str] = set()
        #: Directory service (issue 5): leaders, change intake, request routing.
        self.directories = DirectoryRouter(self, store, directory_store) \
            if directory_store is not None else None
        #: Whole-image updates (issue 14): set by the server (tether.home.updates.Updates).
        self.updates = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.books.write("sockets", self.store.clear_sockets)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def stop(self) -> None:
        if self._flusher:
            self._flusher.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.directories is not None:
            await self.directories.stop()
        if self.updates is not None:
            self.updates.close()
        self.flush_heartbeats()
        self.books.write("sockets", self.store.clear_sockets)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                self.flush_heartbeats()
            except Exception:
                log.exception("heartbeat flush failed")

    def flush_heartbeats(self) -> None:
        """Write the batched heartbeats; kept for the next flush while the disk fails
        (one entry per instance, so the queue stays as small as the fleet)."""
        beats, self._beats = self._beats, {}
        for socket_id in list(self._unrecorded_closes):
            if not self.books.write("sockets", self.store.remove_socket, socket_id):
                break
            self._unrecorded_closes.discard(socket_id)
        for socket_id, row in list(self._unrecorded_opens.items()):
            if not self.books.write("sockets", self.store.add_socket, *row):
                break
            self._unrecorded_opens.pop(socket_id, None)
        if beats and not self.books.write("heartbeats", self.store.record_heartbeats, beats):
            for iid, beat in beats.items():
                self._beats[iid] = {**beat, **self._beats.get(iid, {})}

    def sockets_of(self, identity) -> int:
        """Open sockets of the same enrolled instance."""
        return sum(1 for pe in self.peers.values()
                   if pe.identity.instance_id == identity.instance_id)

    def attach(self, peer: AgentSocket) -> None:
        self.peers[peer.socket_id] = peer

    def detach(self, peer: AgentSocket) -> None:
        self.peers.pop(peer.socket_id, None)
        group = self._by_connector.get(peer.identity.connector, [])
        if peer in group:
            group.remove(peer)
        self._reported.pop(peer.socket_id, None)
        self._reports.pop(peer.socket_id, None)
        self._ack_pushes.pop(peer.socket_id, None)
        if peer.hello is not None:
            recorded = self._unrecorded_opens.pop(peer.socket_id, None) is None
            if recorded and not self.books.write("sockets", self.store.remove_socket,
                                                 peer.socket_id):
                self._unrecorded_closes.add(peer.socket_id)
            if peer.identity.instance_id:
                self._beats.setdefault(peer.identity.instance_id, {})["at"] = time.time()
            if self.directories is not None and peer.identity.role == "instance":
                self.directories.on_detach(peer)

    # --------------------------------------------------------- agent → home

    async def handle_request(self, peer: AgentSocket, message: p.Message) -> dict:
        """The response body for an agent's request, or :class:`HomeError`."""
        op, ident = message.op, peer.identity
        if op is p.Op.HELLO:
            return self._hello(peer, message.body)
        if ident.role == "image" and op is not p.Op.ENROLL:
            raise HomeError(p.ErrorCode.UNAUTHORIZED,
                            f"an image credential may only enroll, not {op.value}")
        if op in (p.Op.ENROLL, p.Op.RENEW):
            handler = enroll.enroll if op is p.Op.ENROLL else enroll.renew
            try:
                response = handler(self.store, self.authority, ident, message.body,
                                   self.enrol_limits)
            except enroll.RateLimited as exc:
                self._close_after_reply(peer, exc.detail)
                raise
        elif op is p.Op.STATUS:
            return self._status_for(peer)
        elif op is p.Op.DIRECTORY_CHANGES:
            if self.directories is None:
                raise HomeError(p.ErrorCode.UNAVAILABLE, "this home keeps no identity store")
            return self.directories.handle_changes(peer, message.body)
        elif op in (p.Op.UPDATE_FETCH, p.Op.UPDATE_REPORT):
            if self.updates is None:
                raise HomeError(p.ErrorCode.UNAVAILABLE, "this home serves no updates")
            if op is p.Op.UPDATE_FETCH:
                return self.updates.handle_fetch(peer, message.body)
            return self.updates.handle_report(peer, message.body)
        else:  # the session refuses other ops already; keep a clear answer anyway
            raise HomeError(p.ErrorCode.WRONG_DIRECTION, f"home does not serve {op.value}")
        response.pop("serial", None)
        return response

    def _close_after_reply(self, peer: AgentSocket, reason: str) -> None:
        """Close a socket that spent its rate limit, once its error reply is out.

        The peer queues the reply as soon as the handler raises (no await in
        between), so this task, which runs later, sends it before closing.
        """
        if peer.socket_id in self._closing_ids:
            return
        self._closing_ids.add(peer.socket_id)

        async def close() -> None:
            event(log, logging.WARNING, "peer_dropped", peer=peer.peer, reason=reason,
                  role=peer.identity.role, image=peer.identity.image_id,
                  instance=peer.identity.instance_id)
            with contextlib.suppress(ConnectionClosed):
                await peer.flush()
            await peer.ws.close(1008, "rate limit exceeded")
        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        task.add_done_callback(lambda _: self._closing_ids.discard(peer.socket_id))

    def _hello(self, peer: AgentSocket, body: dict) -> dict:
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
        # Records only: none of these writes decides whether the instance may connect.
        row = (peer.socket_id, ident.role, ident.connector, ident.image_id, ident.instance_id,
               peer.peer, index)
        if not self.books.write("sockets", self.store.add_socket, *row):
            self._unrecorded_opens[peer.socket_id] = row  # written at a later flush
        latest = self.store.config(ident.connector)
        if ident.role == "instance":
            self._report(peer, body.get("config_version"))
            if not self.books.write("hello", self.store.record_hello, ident.instance_id,
                                    body["agent_version"], body.get("selfcheck"), listening,
                                    body.get("config_version")):
                beat = self._beats.setdefault(ident.instance_id, {})
                beat.update(at=time.time(), agent_version=body["agent_version"],
                            config_version=body.get("config_version"))
                if _report_size_ok(body.get("selfcheck")) and body.get("selfcheck"):
                    beat["selfcheck"] = body["selfcheck"]
                if listening is not None:
                    beat["listening"] = listening
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

    async def after_hello(self, peer: AgentSocket) -> None:
        """Push the newest configuration unless the agent runs the version home
        confirmed for it (see :meth:`reconcile`)."""
        if peer.identity.role != "instance":
            return
        await self.reconcile(peer)
        if self.directories is not None and peer.session.established \
                and peer.ws.close_code is None:
            self.directories.on_hello(peer)
        if self.updates is not None and peer.session.established and peer.ws.close_code is None:
            self.updates.on_hello(peer)

    def _status_for(self, peer: AgentSocket) -> dict:
        row = self.store.instance(peer.identity.instance_id) if peer.identity.instance_id else None
        latest = self.store.config(peer.identity.connector)
        return {"server_time": time.time(), "home_version": __version__,
                "instance_id": peer.identity.instance_id,
                "cert_not_after": row["cert_not_after"] if row else None,
                "config_version": latest["version"] if latest else None}

    def on_event(self, peer: AgentSocket, message: p.Message) -> None:
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
            self._report(peer, body.get("version"))
            self.books.write("config_ack", self.store.record_config_state, iid,
                             body.get("version"), status)
            if self.directories is not None and body["status"] == "applied":
                self.directories.on_config_applied(iid)  # it may now serve new directories
            event(log, logging.INFO if body["status"] != "rejected" else logging.WARNING,
                  "config_ack", instance=iid, version=body.get("version"), status=body["status"],
                  error=body.get("error"), detail=body.get("detail"))
            self._after_ack(peer, body["status"])

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

    def _report(self, peer: AgentSocket, version: int | None) -> None:
        """The agent's own word (hello, ``config.ack``) on the version it runs."""
        self._reported[peer.socket_id] = version
        self._reports[peer.socket_id] = self._reports.get(peer.socket_id, 0) + 1

    def confirmed_version(self, instance_id: str) -> int | None:
        """The version this instance applied when home pushed it (never what it claims)."""
        if instance_id in self._confirmed:
            return self._confirmed[instance_id]
        row = self.store.instance(instance_id)
        return row["config_confirmed"] if row else None

    def _in_step(self, peer: AgentSocket) -> bool:
        """The socket reports the version home confirmed, and that is the newest."""
        latest = self.store.config(peer.identity.connector)
        if latest is None:
            return True
        reported = self._reported.get(peer.socket_id)
        return reported == self.confirmed_version(peer.identity.instance_id) == latest["version"]

    def _after_ack(self, peer: AgentSocket, status: str) -> None:
        """An ack that reports another version than home confirmed (lost file, restored
        state, a document home never signed) gets the newest pushed again. A refused
        push is not retried here (the agent said why), and acks may trigger only
        :data:`MAX_ACK_PUSHES` pushes per socket."""
        if status == "rejected" or peer.ws.close_code is not None or self._in_step(peer):
            return
        count = self._ack_pushes.get(peer.socket_id, 0)
        if count >= MAX_ACK_PUSHES:
            return
        self._ack_pushes[peer.socket_id] = count + 1
        task = asyncio.get_running_loop().create_task(self.reconcile(peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reconcile(self, peer: AgentSocket) -> str:
        """Make the instance behind ``peer`` run home's newest configuration.

        Home trusts only what it confirmed itself: the version it pushed and the
        agent applied in answer to that push. When the socket reports anything else
        (no configuration, an older one, one home never signed) the newest is pushed.
        A reported version above home's newest was never signed by home for this
        instance: the push says so (``replace``) and the agent accepts it although
        its number is lower. Decisions run under the instance's push lock, on the
        newest report of the socket, so a ``config.ack`` racing the hello changes
        nothing. Returns the outcome: ``current``, ``applied``, ``received``,
        ``refused:<code>``, ``no_answer`` or ``none`` (no configuration stored).
        """
        iid = peer.identity.instance_id
        lock = self._push_locks.setdefault(iid, asyncio.Lock())
        async with lock:
            latest = self.store.config(peer.identity.connector)
            if latest is None:
                return "none"
            if peer.ws.close_code is not None:
                return "no_answer"
            version = latest["version"]
            reported = self._reported.get(peer.socket_id)
            if reported == self.confirmed_version(iid) == version:
                return "current"
            body: dict = {}
            if reported is not None and reported > version:
                body = {"replace": True,
                        "reason": f"this instance runs configuration v{reported}, which home "
                                  f"never signed for it (home's newest is v{version}); "
                                  f"replacing it with v{version}"}
                event(log, logging.WARNING, "config_version_unknown", instance=iid,
                      reported=reported, newest=version, peer=peer.peer)
            return await self._push(peer, version, body)

    async def push_config(self, peer: AgentSocket) -> bool:
        """Bring one socket's instance to the newest configuration; True when it runs it."""
        return await self.reconcile(peer) in ("current", "applied")

    async def _push(self, peer: AgentSocket, version: int, extra: dict) -> str:
        iid = peer.identity.instance_id
        made = self.signed_config_for(iid, peer.identity.connector)
        if made is None:
            return "none"
        version, document = made
        reports = self._reports.get(peer.socket_id, 0)
        try:
            response = await peer.request(p.Op.CONFIG_PUSH, {"config": document, **extra},
                                          timeout=PUSH_TIMEOUT)
        except (RequestFailed, AgentUnavailable) as exc:
            outcome = "rejected" if isinstance(exc, RequestFailed) else "undelivered"
            self.books.write("config_state", self.store.record_config_state, iid, None,
                             f"{outcome}:{exc.code.value}")
            event(log, logging.WARNING, "config_push_failed", instance=iid, version=version,
                  code=exc.code.value, detail=exc.detail)
            return f"refused:{exc.code.value}" if isinstance(exc, RequestFailed) else "no_answer"
        answered = response.body.get("version")
        if self._reports.get(peer.socket_id, 0) == reports:  # no ack since: the answer is
            self._reported[peer.socket_id] = answered      # the newest word
        applied = bool(response.body.get("applied")) and answered == version
        if applied:
            self._confirmed[iid] = version
            if self.books.write("config_state", self.store.confirm_config, iid, version):
                self._confirmed.pop(iid, None)
        else:
            self.books.write("config_state", self.store.record_config_state, iid, answered,
                             "received")
        event(log, logging.INFO, "config_pushed", instance=iid, version=version,
              applied=applied, replace=bool(extra.get("replace")))
        return "applied" if applied else "received"

    async def push_config_to_connector(self, connector: str) -> dict:
        """After ``config set``: bring every connected instance of the connector to the
        newest version (one socket each, those not being rotated out first).

        Returns ``pushed`` (instances now running it), ``no_answer`` (instance ids
        that did not answer within :data:`PUSH_TIMEOUT`: they get it when they
        reconnect) and ``refused`` (instance id -> error code).
        """
        chosen: dict[str, AgentSocket] = {}
        peers = self._by_connector.get(connector, [])
        for peer in sorted(peers, key=lambda pe: pe.draining):  # sockets staying open first
            chosen.setdefault(peer.identity.instance_id, peer)
        results = await asyncio.gather(*(self.reconcile(pe) for pe in chosen.values()),
                                       return_exceptions=True)
        report: dict = {"pushed": 0, "no_answer": [], "refused": {}}
        for iid, result in zip(chosen, results):
            if isinstance(result, BaseException):
                log.error("configuration push failed", exc_info=result,
                          extra={"tether_fields": {"instance": iid}})
                report["refused"][iid] = "internal"
            elif result in ("current", "applied"):
                report["pushed"] += 1
            elif result == "no_answer":
                report["no_answer"].append(iid)
            elif result.startswith("refused:"):
                report["refused"][iid] = result.removeprefix("refused:")
        return report

    async def drop_serial(self, serial: str) -> int:
        """After ``revoke``: close sockets that authenticated with that certificate."""
        victims = [pe for pe in self.peers.values() if pe.identity.serial == serial]
        for peer in victims:
            event(log, logging.WARNING, "revoked_socket_closed", peer=peer.peer, serial=serial)
            await peer.ws.close(1008, "certificate revoked")
        return len(victims)

    # ------------------------------------------------------ in-process API

    def agents(self, connector: str | None = None, *,
               cluster: str | None = None) -> list[AgentSocket]:
        """Established instance sockets of a connector, or of every connector in a cluster."""
        if cluster is not None:
            names = [row["name"] for row in self.store.connectors() if row["cluster"] == cluster]
        else:
            names = [connector]
        return [pe for name in names for pe in self._by_connector.get(name, [])
                if pe.session.established]

    def _candidates(self, connector: str | None, cluster: str | None) -> list[AgentSocket]:
        """Sockets to try in order: round-robin over the ones not draining, then the
        draining ones (they still answer, but are about to close)."""
        key = f"cluster:{cluster}" if cluster is not None else str(connector)
        group = self.agents(connector, cluster=cluster)
        if not group:
            raise AgentUnavailable(f"no agent of {key.replace(':', ' ')} is connected")
        start = next(self._round_robin.setdefault(key, itertools.count())) % len(group)
        rotated = group[start:] + group[:start]
        return [pe for pe in rotated if not pe.draining] + [pe for pe in rotated if pe.draining]

    def _pick(self, connector: str | None, cluster: str | None = None) -> AgentSocket:
        return self._candidates(connector, cluster)[0]

    async def request(self, connector: str | None, op: p.Op, body: dict, timeout: float = 30.0,
                      *, cluster: str | None = None, failover: bool | None = None,
                      peers: list[AgentSocket] | None = None,
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
    async def _ask(peer: AgentSocket, op: p.Op, body: dict, timeout: float,
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
