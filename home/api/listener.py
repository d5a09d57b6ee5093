"""The API's HTTPS listener: uvicorn's Server inside home's own event loop.

Certificate: ``api.crt``/``api.key`` in the state directory. When missing, the
first ``serve --api-listen`` issues them from home's CA for the names of the
agents' server certificate (identity providers then trust home's CA, or the
operator replaces both files with a certificate from a CA they already trust;
home uses whatever pair it finds). TLS 1.2 and 1.3, no client certificate:
identity providers cannot present one; they authenticate with OAuth2.

Why not ``uvicorn.Server.serve()``: it installs its own SIGINT/SIGTERM
handlers, and home's loop owns those. :class:`ApiListener` binds the socket
itself (a clear error for a port in use instead of uvicorn's ``sys.exit``),
then drives uvicorn's startup, main loop and shutdown.

Slow clients: asyncio drops a TLS handshake that takes over 60 s (its default); a client
that has not sent a whole request head within :data:`HEAD_SECONDS` of
connecting (or of its previous response) is disconnected by
:class:`_Protocol`, which also bounds a head's size; the body has its own deadline
and size limit (app.Guard). Connections
above :data:`MAX_CONNECTIONS` get 503 from uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tether.home import admin, pki
from tether.home.logs import event
from tether.home.paths import StatePaths, write_private, write_public

log = logging.getLogger("tether.home.api")
HEAD_SECONDS = 10.0
#: Largest request head (request line and headers) the API reads.
MAX_HEAD_BYTES = 64 * 1024
MAX_CONNECTIONS = 4096
BACKLOG = 2048


def ensure_certificate(paths: StatePaths) -> None:
    """Issue ``api.crt``/``api.key`` from home's CA when they are not there."""
    if paths.api_cert.exists() and paths.api_key.exists():
        return
    server = pki.load_cert_pem(paths.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [str(n.value) for n in sans]
    ca_key, ca_cert = admin.load_ca(paths)
    key, issued = pki.issue_server(ca_key, ca_cert, names)
    write_private(paths.api_key, pki.key_pem(key))
    write_public(paths.api_cert, pki.cert_pem(issued.cert))
    event(log, logging.INFO, "api_certificate_issued", names=names, serial=issued.serial)


def api_names(paths: StatePaths) -> list[str]:
    cert = pki.load_cert_pem(paths.api_cert.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in sans]


def tls_context(paths: StatePaths) -> ssl.SSLContext:
    """Server-only TLS 1.2/1.3 with the API's certificate; no client certificate asked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(certfile=str(paths.api_cert), keyfile=str(paths.api_key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound for each request head.

    Why httptools, not h11: h11 parses and writes each request in pure Python,
    measured 0.12 ms of CPU per request, a fifth of home's CPU per login through
    the API; httptools (llhttp, C) takes 2 us. Unlike h11, llhttp does not bound
    a request head (h11: 16 KiB), so :meth:`data_received` does: a head above
    :data:`MAX_HEAD_BYTES` gets 431 and the connection is closed. Bytes are
    counted per received chunk while a head is awaited or being read; asyncio's
    TLS layer hands over at most 32 KiB at a time (tlsconf), so a head and the
    start of its body in one chunk stay far below the bound.
    """

    _head_timer: asyncio.TimerHandle | None = None
    _in_head = True
    _head_bytes = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(HEAD_SECONDS, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._head_too_large()
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False  # a whole request head arrived
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # the next bytes are the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport is not None and not self.transport.is_closing():
            self._disarm()
            self._arm()

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport is not None and not self.transport.is_closing():
            event(log, logging.INFO, "api_slow_client_closed", peer=str(self.client))
            self.transport.close()

    def _head_too_large(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        event(log, logging.INFO, "api_request_head_too_large", peer=str(self.client))
        text = f"request head above {MAX_HEAD_BYTES} bytes; send fewer or shorter headers\n"
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: text/plain; charset=utf-8\r\n"
                             b"content-length: " + str(len(text)).encode() + b"\r\n"
                             b"connection: close\r\n\r\n" + text.encode())
        self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class ListenError(ValueError):
    """The API cannot listen where asked."""


class ApiListener:
    """Serve an ASGI app over HTTPS in the running loop: :meth:`start`, then :meth:`stop`."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self.host, self.port, self.context = host, port, context
        self.server: uvicorn.Server | None = None
        self.sock: socket.socket | None = None
        self.bound: tuple | None = None
        self._loop_task: asyncio.Task | None = None

    def bind(self) -> tuple:
        """Open the listening socket (port 0: the kernel picks); returns (host, port)."""
        try:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self.sock = socket.create_server((self.host, self.port), family=family,
                                             backlog=BACKLOG)
        except OSError as exc:
            raise ListenError(f"cannot listen on {self.host}:{self.port} for the API: "
                              f"{exc.strerror or exc}; choose another --api-listen or stop what "
                              "uses that port") from None
        # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and
        # create_server's have proto 0: without this, every response waits ~40 ms for
        # the client's delayed ACK (Nagle). Accepted sockets inherit it from the listener.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.bound = self.sock.getsockname()[:2]
        return self.bound

    async def start(self, app) -> None:
        """Serve ``app`` on the bound socket from now on."""
        config = uvicorn.Config(app, http=_Protocol, lifespan="off", log_config=None,
                                access_log=False, server_header=False,
                                limit_concurrency=MAX_CONNECTIONS, backlog=BACKLOG,
                                timeout_keep_alive=30, timeout_graceful_shutdown=5,
                                ssl_context_factory=lambda config, default: self.context)
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self.sock])
        self.server = server
        self._loop_task = asyncio.get_running_loop().create_task(server.main_loop())

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.should_exit = True
        if self._loop_task is not None:
            await self._loop_task
        await self.server.shutdown(sockets=[self.sock] if self.sock else None)
        self.server = None

    def address(self) -> str:
        host, port = self.bound or (self.host, self.port)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
