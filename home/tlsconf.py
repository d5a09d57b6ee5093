"""Home's TLS: 1.3 only, client certificate required, home's CA the only anchor.

OpenSSL refuses a client without certificate, with a certificate from another
CA or with an expired one during the handshake, before any HTTP is read. asyncio
drops such failures silently (it logs them in debug mode only), so the context
uses an :class:`ssl.SSLObject` subclass that reports every failed handshake to
home's log with OpenSSL's reason (``sslobject_class`` is the documented hook).
Revocation is checked after the handshake, against the database (see
:mod:`tether.home.gate`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from tether.home.logs import event

log = logging.getLogger("tether.home.tls")

#: Failed handshakes since start, by reason (reported by ``status`` of the running server).
REFUSALS: dict[str, int] = {}


class _LoggingSSLObject(ssl.SSLObject):
    """An SSLObject that logs the reason of a failed server-side handshake, and a
    handshake that did not finish in time (asyncio aborts those silently)."""

    _tether_state = None  # None: not started, "started", "done"
    _tether_timer = None

    def do_handshake(self) -> None:
        if self._tether_state is None:
            self._tether_state = "started"
            self._watch()
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            self._finished()
            reason = exc.reason or exc.__class__.__name__
            REFUSALS[reason] = REFUSALS.get(reason, 0) + 1
            event(log, logging.WARNING, "tls_refused", reason=reason,
                  detail=getattr(exc, "verify_message", None) or str(exc))
            raise
        self._finished()

    def _finished(self) -> None:
        # Cancel the watch: a pending timer would keep this object (and OpenSSL's
        # buffers) alive for the whole time-out after every handshake.
        self._tether_state = "done"
        if self._tether_timer is not None:
            self._tether_timer.cancel()
            self._tether_timer = None

    def _watch(self) -> None:
        timeout = getattr(self.context, "tether_handshake_timeout", None)
        if timeout is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # Checked just after asyncio's own ssl_handshake_timeout (the same value).
        self._tether_timer = loop.call_later(timeout + 0.05, self._check_finished, timeout)

    def _check_finished(self, timeout: float) -> None:
        self._tether_timer = None
        if self._tether_state == "done":
            return
        self._tether_state = "done"
        REFUSALS["handshake_timeout"] = REFUSALS.get("handshake_timeout", 0) + 1
        callback = getattr(self.context, "tether_on_timeout", None)
        if callback is not None:
            callback()
        event(log, logging.WARNING, "handshake_timeout", stage="tls",
              detail=f"TLS handshake not completed within {timeout:g} s (the client stalled "
                     "or went away)")


def server_context(ca_file: Path, cert_file: Path, key_file: Path, *,
                   handshake_timeout: float | None = None,
                   on_timeout: Callable[[], None] | None = None) -> ssl.SSLContext:
    """Mutually authenticated TLS 1.3 server context.

    ``handshake_timeout``: the server's ``ssl_handshake_timeout``; a handshake still
    unfinished then is logged (``handshake_timeout``) and ``on_timeout`` is called.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_file))  # only home's CA; no system store
    ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    # No TLS 1.3 session tickets: every connection presents (and home re-checks) its
    # certificate. (OP_NO_TICKET would switch OpenSSL to *stateful* tickets kept in
    # the server's session cache: ~12 KiB per connection, up to 20,480 of them.)
    ctx.num_tickets = 0
    ctx.sslobject_class = _LoggingSSLObject
    ctx.tether_handshake_timeout = handshake_timeout
    ctx.tether_on_timeout = on_timeout
    return ctx


#: Per-connection TLS read buffer. asyncio allocates 256 KiB per TLS connection
#: up front (CPython gh-109534); 32 KiB still holds two full TLS records and
#: cuts home's memory per agent socket by ~220 KiB, which decides whether a
#: small VM holds 2,000 agents.
SSL_READ_BUFFER = 32 * 1024


def tune_asyncio_ssl_buffers(size: int = SSL_READ_BUFFER) -> None:
    """Shrink asyncio's per-connection TLS read buffer for this process (home only)."""
    import asyncio.sslproto

    if getattr(asyncio.sslproto.SSLProtocol, "max_size", None) is not None:
        asyncio.sslproto.SSLProtocol.max_size = size


def peer_certificate(transport) -> x509.Certificate | None:
    """The verified client certificate of a connection (None if there is none)."""
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    return x509.load_der_x509_certificate(der) if der else None
