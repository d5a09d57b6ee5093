"""``tether-home serve``: the WebSocket/TLS server agents dial into.

websockets (asyncio API) over TLS 1.3 with required client certificates
(:mod:`tether.home.tlsconf`); before the WebSocket opens, :func:`_process_request`
checks the subprotocol and maps the certificate to an identity
(:mod:`tether.home.gate`); each accepted socket becomes an
:class:`~tether.home.peer.AgentPeer` registered with the :class:`~tether.home.hub.Hub`.

Frames up to :data:`tether.protocol.MAX_FRAME_BYTES` are processed; frames up to
twice that get a ``too_large`` error reply; anything larger is cut by
websockets' ``max_size`` with close code 1009.

Caps per credential kind (issue 11): an enrolled instance holds at most
:data:`MAX_SOCKETS_PER_AGENT` sockets; image-credential sockets are few (at most
:data:`MAX_IMAGE_SOCKETS` in all and :data:`MAX_IMAGE_SOCKETS_PER_IMAGE` per
image) and short-lived (closed after :data:`~tether.home.peer.ENROLL_SECONDS`),
because every copy of an image holds the same credential. Over a cap, the
upgrade is refused with 429 and the agent backs off. A TLS or WebSocket
handshake that does not complete within :data:`HANDSHAKE_SECONDS` is logged
(``handshake_timeout``) and counted (``status``: ``handshake_timeouts``).
"""

from __future__ import annotations

import asyncio
import http
import logging
import os
import resource
import signal
import ssl
import uuid
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from tether import __version__, configsig
from tether import protocol as p
from tether.home import control, enroll, gate, pki, tlsconf
from tether.home.errors import HomeError
from tether.home.hub import Hub
from tether.home.directorystore import DirectoryStore
from tether.home.logs import event
from tether.home.paths import StateError, StatePaths
from tether.home.peer import ENROLL_SECONDS, HELLO_TIMEOUT, AgentPeer, PeerLimits
from tether.home.store import Store
from tether.home.updates import Updates

log = logging.getLogger("tether.home.server")
PING_SECONDS = 30.0
MAX_SIZE = 2 * p.MAX_FRAME_BYTES
#: Sockets one enrolled instance may hold at once: agents use 2, plus overlap while rotating.
MAX_SOCKETS_PER_AGENT = 16
#: Image-credential sockets in all, and per image (machines of one image enrolling at
#: the same moment; the others get 429 and retry with backoff).
MAX_IMAGE_SOCKETS = 64
MAX_IMAGE_SOCKETS_PER_IMAGE = 16
#: TLS handshake and then WebSocket upgrade, each (websockets' ``open_timeout``).
HANDSHAKE_SECONDS = 10.0
#: How long home waits for a closing socket to go (close handshake, TLS shutdown);
#: websockets' default of 10 s kept every socket home dropped for violations open
#: 10 s longer (the end of TLS does not complete with websockets' own client).
CLOSE_SECONDS = 2.0


class ListenError(ValueError):
    """--listen is not HOST:PORT."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


def parse_listen(value: str) -> Listen:
    """``HOST:PORT`` or ``[V6]:PORT``; port 0 picks a free port (tests)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenError(f"--listen {value!r} must be HOST:PORT, e.g. 0.0.0.0:443 or [::]:443")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ListenError(f"--listen {value!r} needs a host (0.0.0.0 for every address)")
    return Listen(host, int(port))


def _readable(path, what: str, hint: str, load):
    """``load(bytes of path)``, or one sentence (StateError) saying which file is bad."""
    try:
        return load(path.read_bytes())
    except (ValueError, TypeError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0] or type(exc).__name__
        raise StateError(f"{path} ({what}) cannot be loaded: {reason}; {hint}") from None


def load_authority(paths: StatePaths) -> tuple[enroll.Authority, object]:
    """CA and config-signing key from the state directory (a damaged file: StateError)."""
    backup = "restore it from a backup of the state directory"
    ca_key = _readable(paths.ca_key, "home's CA key", backup, pki.load_key_pem)
    ca_cert = _readable(paths.ca_cert, "home's CA certificate", backup, pki.load_cert_pem)
    config_key = _readable(paths.config_key, "the config-signing key", backup,
                           configsig.load_private_key)
    authority = enroll.Authority(ca_key=ca_key, ca_cert=ca_cert,
                                 ca_pem=paths.ca_cert.read_text(),
                                 config_key_pem=configsig.public_key_pem(config_key).decode())
    return authority, config_key


def _server_tls(paths: StatePaths, *, handshake_timeout: float, on_timeout):
    """Home's TLS context; a damaged server key or certificate is one sentence."""
    hint = "re-issue them with `tether-home server-cert`"
    _readable(paths.server_key, "home's TLS key", hint, pki.load_key_pem)
    _readable(paths.server_cert, "home's TLS certificate", hint, pki.load_cert_pem)
    try:
        return tlsconf.server_context(paths.ca_cert, paths.server_cert, paths.server_key,
                                      handshake_timeout=handshake_timeout,
                                      on_timeout=on_timeout)
    except (ssl.SSLError, OSError) as exc:
        raise StateError(f"home's TLS key and certificate in {paths.root} do not load "
                         f"together ({exc}); {hint}") from None


class HomeServer:
    """Everything ``serve`` runs: TLS WebSocket listener, hub, control socket."""

    def __init__(self, paths: StatePaths, listen: Listen, *,
                 hello_timeout: float = HELLO_TIMEOUT,
                 max_sockets: int = MAX_SOCKETS_PER_AGENT,
                 enroll_timeout: float = ENROLL_SECONDS,
                 max_image_sockets: int = MAX_IMAGE_SOCKETS,
                 max_image_sockets_per_image: int = MAX_IMAGE_SOCKETS_PER_IMAGE,
                 handshake_timeout: float = HANDSHAKE_SECONDS,
                 api_listen: Listen | None = None, api_issuer: str | None = None) -> None:
        self.paths = paths.require_initialized()
        self.listen = listen
        self.hello_timeout = hello_timeout
        self.max_sockets = max_sockets
        self.enroll_timeout = enroll_timeout
        self.max_image_sockets = max_image_sockets
        self.max_image_sockets_per_image = max_image_sockets_per_image
        self.handshake_timeout = handshake_timeout
        self.limits = PeerLimits()
        #: Open image-credential sockets per image id (counted at attach, exact).
        self.image_sockets: dict[str, int] = {}
        #: Handshakes that did not complete in time, by stage ("tls", "websocket").
        self.handshake_timeouts: dict[str, int] = {}
        authority, config_key = load_authority(paths)
        self.ssl = _server_tls(paths, handshake_timeout=handshake_timeout,
                               on_timeout=self._tls_handshake_timed_out)
        # both databases are checked page by page at start: damage is refused now, with
        # what to do, instead of surfacing as a traceback in the middle of a request
        self.store = Store(paths.db)
        try:
            self.store.check()
            self.directory_store = DirectoryStore(paths.identity_db)
        except Exception:
            self.store.close()
            raise
        try:
            self.directory_store.check()
        except Exception:
            self.store.close()
            self.directory_store.close()
            raise
        self.hub = Hub(self.store, authority, config_key, self.directory_store)
        self.hub.updates = Updates(self.hub, paths)
        self.bound: list[tuple] = []
        self._stop = asyncio.Event()
        #: The HTTPS API (issue 15), only with --api-listen (needs the `home` extra).
        self.api_listen, self.api_issuer, self.api = api_listen, api_issuer, None

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`), then close cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            server = await ws_serve(self._handler, self.listen.host, self.listen.port,
                                    ssl=self.ssl, subprotocols=[p.SUBPROTOCOL],
                                    max_size=MAX_SIZE, process_request=self._process_request,
                                    compression=None, ping_interval=PING_SECONDS,
                                    ping_timeout=PING_SECONDS,
                                    server_header=f"tether-home/{__version__}", backlog=1024,
                                    open_timeout=self.handshake_timeout,
                                    close_timeout=CLOSE_SECONDS,
                                    create_connection=self._connection_class())
        except OSError as exc:
            raise ListenError(f"cannot listen on {self.listen.host}:{self.listen.port}: "
                              f"{exc.strerror or exc}; choose another --listen or stop what "
                              "uses that port (ports below 1024 need root or "
                              "CAP_NET_BIND_SERVICE)") from None
        self.hub.start()
        async with server:
            self.bound = [s.getsockname()[:2] for s in server.sockets]
            ctl = await control.start(self.paths.control_socket, self._control)
            if self.api_listen is not None:
                from tether.home.api import service  # the `home` extra: only with --api-listen

                self.api = await service.start(self.paths, self.api_listen.host,
                                               self.api_listen.port, self._api_backend(),
                                               issuer=self.api_issuer)
            event(log, logging.INFO, "listening", addresses=self.addresses(),
                  state=str(self.paths.root), subprotocol=p.SUBPROTOCOL)
            try:
                await self._stop.wait()
            finally:
                ctl.close()
                self.paths.control_socket.unlink(missing_ok=True)
                if self.api is not None:
                    await self.api.stop()
                event(log, logging.INFO, "stopping", sockets=len(self.hub.peers))
                server.close()
                await server.wait_closed()
                await self.hub.stop()
                self.store.close()
                self.directory_store.close()

    def stop(self) -> None:
        self._stop.set()

    def addresses(self) -> list[str]:
        return [f"[{h}]:{pt}" if ":" in h else f"{h}:{pt}" for h, pt in self.bound]

    def _process_request(self, connection, request):
        """Before the upgrade: right subprotocol, known and unrevoked certificate."""
        peer = _peer(connection)
        if p.SUBPROTOCOL not in gate.offered_subprotocols(request.headers):
            event(log, logging.WARNING, "handshake_refused", peer=peer, reason="subprotocol",
                  offered=request.headers.get("Sec-WebSocket-Protocol"))
            return connection.respond(http.HTTPStatus.BAD_REQUEST,
                                      f"tether home speaks WebSocket subprotocol "
                                      f"{p.SUBPROTOCOL} only\n")
        try:
            cert = tlsconf.peer_certificate(connection.transport)
            identity = gate.identify(self.store, cert)
            self._check_caps(identity)
            connection.tether_identity = identity
        except gate.Refusal as refusal:
            event(log, logging.WARNING, "handshake_refused", peer=peer, reason=refusal.reason,
                  detail=refusal.text)
            return connection.respond(refusal.status, refusal.text + "\n")
        return None

    def _check_caps(self, identity: gate.Identity) -> None:
        """Refuse a socket over its credential kind's cap (429: back off and retry)."""
        if identity.role == "instance":
            if self.hub.sockets_of(identity) >= self.max_sockets:
                raise gate.Refusal(http.HTTPStatus.TOO_MANY_REQUESTS, "too_many_sockets",
                                   f"this appliance already holds {self.max_sockets} sockets; "
                                   "close some before opening more")
            return
        if self.image_sockets.get(identity.image_id, 0) >= self.max_image_sockets_per_image:
            raise gate.Refusal(http.HTTPStatus.TOO_MANY_REQUESTS, "too_many_image_sockets",
                               f"{self.max_image_sockets_per_image} machines of this image are "
                               "enrolling; retry in a few seconds")
        if sum(self.image_sockets.values()) >= self.max_image_sockets:
            raise gate.Refusal(http.HTTPStatus.TOO_MANY_REQUESTS, "too_many_image_sockets",
                               f"{self.max_image_sockets} machines are enrolling; retry in a "
                               "few seconds")

    async def _handler(self, connection) -> None:
        identity = connection.tether_identity
        try:  # again, now without a wait before the socket counts (concurrent upgrades)
            self._check_caps(identity)
        except gate.Refusal as refusal:
            self.limits.count("refused_over_cap_after_upgrade")
            event(log, logging.WARNING, "handshake_refused", peer=_peer(connection),
                  reason=refusal.reason, detail=refusal.text)
            await connection.close(1013, refusal.text[:100])
            return
        peer = AgentPeer(connection, identity, self.hub, uuid.uuid4().hex, self.limits)
        if identity.role == "image":
            self.image_sockets[identity.image_id] = \
                self.image_sockets.get(identity.image_id, 0) + 1
        self.hub.attach(peer)
        event(log, logging.INFO, "connected", peer=peer.peer, role=identity.role,
              connector=identity.connector, instance=identity.instance_id,
              serial=identity.serial)
        try:
            await peer.run(self.hello_timeout, self.enroll_timeout)
        finally:
            if identity.role == "image":
                left = self.image_sockets.pop(identity.image_id, 1) - 1
                if left > 0:
                    self.image_sockets[identity.image_id] = left
            self.hub.detach(peer)
            event(log, logging.INFO, "disconnected", peer=peer.peer, role=identity.role,
                  instance=identity.instance_id, code=connection.close_code,
                  reason=connection.close_reason or None,
                  violations=peer.session.violations)

    def _tls_handshake_timed_out(self) -> None:
        self.handshake_timeouts["tls"] = self.handshake_timeouts.get("tls", 0) + 1

    def _connection_class(self) -> type[ServerConnection]:
        """websockets' connection, reporting an upgrade that times out (it says nothing)."""
        server = self

        class TimedConnection(ServerConnection):
            async def handshake(self, *args, **kwargs) -> None:
                try:
                    await super().handshake(*args, **kwargs)
                except asyncio.CancelledError:
                    if self.request is None and not server._stop.is_set():
                        server.handshake_timeouts["websocket"] = \
                            server.handshake_timeouts.get("websocket", 0) + 1
                        event(log, logging.WARNING, "handshake_timeout", stage="websocket",
                              peer=_peer(self),
                              detail=f"no WebSocket upgrade within "
                                     f"{server.handshake_timeout:g} s after TLS")
                    raise

        return TimedConnection

    async def _control(self, request: dict) -> dict:
        cmd = request["cmd"]
        if cmd == "live":
            return {"ok": True, "addresses": self.addresses(), "pid": os.getpid(),
                    "api_address": self.api.address() if self.api else None,
                    "tls_refusals": dict(tlsconf.REFUSALS),
                    "handshake_timeouts": dict(self.handshake_timeouts),
                    "image_sockets": sum(self.image_sockets.values()),
                    "limits": dict(self.limits.counts), **self.hub.live()}
        if cmd == "config-changed":
            report = await self.hub.push_config_to_connector(str(request.get("connector")))
            self.hub.directories.on_config_changed()
            return {"ok": True, **report}
        if cmd == "cluster-changed":
            self.hub.directories.on_config_changed()
            return {"ok": True, "directories": self.hub.directories.live()}
        if cmd == "directories":
            return {"ok": True, "directories": self.hub.directories.live()}
        if cmd in DIRECTORY_COMMANDS:
            return await self._directory_command(cmd, request)
        if cmd == "update-changed":
            offered = await self.hub.updates.drive(str(request.get("connector")))
            return {"ok": True, "offered": offered}
        if cmd == "revoked":
            closed = await self.hub.drop_serial(str(request.get("serial")).lower())
            return {"ok": True, "closed": closed}
        return {"ok": False, "error": f"unknown control command {cmd!r}"}


    async def _directory_command(self, cmd: str, request: dict) -> dict:
        """authenticate / search / provision for the CLI ("home's API")."""
        router = self.hub.directories
        directory = request.get("directory")
        try:
            if not isinstance(directory, str):
                raise HomeError(p.ErrorCode.BAD_TYPE, "give the directory id as a string")
            if cmd == "authenticate":
                username, password = request.get("username"), request.get("password")
                if not isinstance(username, str) or not isinstance(password, str):
                    raise HomeError(p.ErrorCode.BAD_TYPE, "username and password are strings")
                groups = request.get("groups", True)
                if not isinstance(groups, bool):
                    raise HomeError(p.ErrorCode.BAD_TYPE, "groups is true or false")
                result = await router.authenticate(directory, username, password, groups=groups)
            elif cmd == "search":
                limit = request.get("limit")
                result = await router.search(directory, str(request.get("kind", "user")),
                                             str(request.get("filter", "")),
                                             limit if isinstance(limit, int) else None)
            else:
                order = request.get("order")
                if not isinstance(order, dict):
                    raise HomeError(p.ErrorCode.BAD_TYPE, "the order must be a JSON object")
                result = await router.provision(directory, order)
        except HomeError as exc:
            return {"ok": False, "code": exc.code.value, "error": exc.detail}
        return {"ok": True, "result": result}

    def _api_backend(self):
        """What the HTTPS API may ask of this server: the directory commands (the same
        routing as the control socket's), the status document, readiness."""
        from tether.home.api.app import Backend
        from tether.home.api.statuspage import collect

        def ready() -> tuple[bool, str]:
            if not self.bound:
                return False, "the agents' listener is not bound yet"
            return True, f"{len(self.hub.peers)} agent socket(s)"
        return Backend(
            authenticate=lambda d, u, pw, groups=True: self._directory_command(
                "authenticate", {"directory": d, "username": u, "password": pw,
                                 "groups": groups}),
            provision=lambda d, order: self._directory_command(
                "provision", {"directory": d, "order": order}),
            status=lambda: collect(self.store, self.directory_store,
                                   {"addresses": self.addresses(), **self.hub.live()},
                                   self.hub.updates.instance_states()),
            ready=ready, directory_store=self.directory_store)


DIRECTORY_COMMANDS = frozenset({"authenticate", "search", "provision"})


def _peer(connection) -> str:
    address = connection.remote_address or ("?", 0)
    return f"{address[0]}:{address[1]}"


def raise_file_limit() -> int:
    """Lift the soft open-files limit to the hard one: every agent socket is a file
    descriptor, and the usual soft default (1024) would cap home near 1,000 agents."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def serve(paths: StatePaths, listen: Listen, **options) -> None:
    """Run the server in this process until a signal stops it (options: see HomeServer)."""
    limit = raise_file_limit()
    tlsconf.tune_asyncio_ssl_buffers()
    event(log, logging.INFO, "starting", version=__version__, open_files_limit=limit)
    asyncio.run(HomeServer(paths, listen, **options).run())
