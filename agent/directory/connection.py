"""Server pool, TLS and bind: turn a DirectoryConfig into a bound ldap3 connection.

Why our own pool instead of ldap3's ServerPool: we must tell apart "this server
is down, try the next" from "the password is wrong" or "the certificate does
not match" (same on every server, an operator must act), and a sync that loses
its server mid-way must know which server it moved to.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
from typing import Iterator

import ldap3
from ldap3.core import exceptions as lx

from .config import DirectoryConfig, ServerAddress
from .errors import DirectoryError
from .wire import install as install_fast_receive

# Errors that mean "this server cannot be used now" (try the next one).
DOWN_ERRORS = (lx.LDAPSocketOpenError, lx.LDAPSocketReceiveError, lx.LDAPSocketSendError,
               lx.LDAPSessionTerminatedByServerError, lx.LDAPSocketCloseError, lx.LDAPCommunicationError,
               lx.LDAPResponseTimeoutError, lx.LDAPMaximumRetriesError, socket.timeout, ConnectionError)


def _tls(config: DirectoryConfig) -> ldap3.Tls | None:
    if config.tls == "plain":
        return None
    return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file, ca_certs_data=config.ca_pem,
                     version=ssl.PROTOCOL_TLS_CLIENT)


def make_server(config: DirectoryConfig, address: ServerAddress) -> ldap3.Server:
    """An ldap3.Server for one pool member, with the configured TLS mode."""
    return ldap3.Server(address.host, port=address.port, use_ssl=config.tls == "ldaps",
                        tls=_tls(config), get_info=ldap3.NONE,
                        connect_timeout=config.connect_timeout)


def _is_tls_failure(exc: BaseException) -> bool:
    text = repr(exc).lower()
    return isinstance(exc, (lx.LDAPStartTLSError, ssl.SSLError, lx.LDAPCertificateError)) or any(
        w in text for w in ("certificate", "ssl", "tls", "hostname"))


def tune_socket(conn: ldap3.Connection) -> None:
    """Disable Nagle on the client socket.

    Why: LDAP exchanges are small request/response pairs; with Nagle on, each
    TLS-wrapped request waits for the peer's delayed ACK (~40 ms per bind or
    page on Linux), which measured 20x slower binds here.
    """
    sock = getattr(conn, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


# ldap3 strategies that read the socket in a receiver thread of their own.
THREADED_STRATEGIES = (ldap3.ASYNC, ldap3.ASYNC_STREAM)
# A dead peer of a long-lived (notification) connection is found within
# KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT seconds.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3


def keep_alive(conn: ldap3.Connection) -> None:
    """TCP keepalive on a connection that waits for the server for hours (a persistent search).

    Why not a receive timeout: ldap3's receiver thread treats *every* socket
    error as a timeout when one is set and reads again, so a connection reset
    left it spinning on the dead socket forever while the connection still
    looked open. Threaded connections therefore block without a timeout (any
    error ends the thread and closes the connection), and keepalive probes turn
    a silently vanished server into such an error.
    """
    sock = getattr(conn, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass


def open_connection(config: DirectoryConfig, address: ServerAddress, user: str | None = None,
                    password: str | None = None, strategy=ldap3.SYNC) -> ldap3.Connection:
    """Connect to one server, secure it, bind; raise DirectoryError with a clear code."""
    user = config.bind_dn if user is None else user
    password = config.bind_password if password is None else password
    threaded = strategy in THREADED_STRATEGIES
    conn = ldap3.Connection(make_server(config, address), user=user, password=password,
                            client_strategy=strategy,
                            receive_timeout=None if threaded else config.receive_timeout,
                            raise_exceptions=False, auto_range=False, return_empty_attributes=False,
                            read_only=False,
                            check_names=False)
    install_fast_receive(conn)
    where = str(address)
    try:
        conn.open()
        tune_socket(conn)
        if threaded:
            keep_alive(conn)
        if config.tls == "starttls" and not conn.start_tls():
            raise DirectoryError("tls", f"StartTLS refused by {where}: {conn.result.get('message')}", where)
        if not conn.bind():
            res = dict(conn.result or {})
            discard(conn)
            if res.get("result") == 49:
                raise DirectoryError("bind_failed", f"bind as {user!r} was refused: invalid credentials",
                                     where, reason=res.get("message"))
            raise DirectoryError("bind_failed", f"bind as {user!r} failed: {res.get('description')}",
                                 where, reason=res.get("message"))
    except DirectoryError:
        discard(conn)
        raise
    except lx.LDAPSocketOpenError as exc:
        if _is_tls_failure(exc):
            raise DirectoryError("tls", f"TLS with {where} failed: {_tls_reason(exc, address)}", where) from None
        raise DirectoryError("server_down", f"cannot connect to {where}: {_short(exc)}", where) from None
    except (lx.LDAPStartTLSError, ssl.SSLError) as exc:
        discard(conn)
        raise DirectoryError("tls", f"TLS with {where} failed: {_tls_reason(exc, address)}", where) from None
    except DOWN_ERRORS as exc:
        discard(conn)
        raise DirectoryError("server_down", f"{where} stopped answering: {_short(exc)}", where) from None
    return conn


def discard(conn: ldap3.Connection, wait: float = 5.0) -> None:
    """Close `conn` for good; with a threaded strategy, only once its receiver thread ended.

    Why: ldap3's ASYNC/ASYNC_STREAM strategies read the socket in a thread that
    starts at open (before the bind). ldap3's unbind closes the socket under
    that thread: with a receive timeout the thread then spins forever on
    `socket None`, and under load it could call recv() once more on the closed
    descriptor after the next connection reused it, eating part of that
    connection's TLS handshake (a wrong password reported as `tls`,
    WRONG_VERSION_NUMBER). Shutting the socket down first makes the thread's
    recv return end-of-stream; the descriptor is closed only after it exited.
    """
    receiver = getattr(conn.strategy, "receiver", None)
    sock = conn.socket
    if receiver is not None and sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if receiver is not threading.current_thread():
            receiver.join(wait)
    try:
        conn.unbind()
    except Exception:  # noqa: BLE001 - the server may be gone already
        pass
    try:
        conn.strategy.close()
    except Exception:  # noqa: BLE001
        pass


def _tls_reason(exc: BaseException, address: ServerAddress) -> str:
    """A one-line TLS failure reason instead of ldap3's certificate dump."""
    text = str(exc)
    if "doesn't match" in text or "does not match" in text or "hostname" in text.lower():
        names = re.findall(r"\('DNS', '([^']+)'\)|\('IP Address', '([^']+)'\)", text)
        named = ", ".join(a or b for a, b in names) or "other names"
        return (f"the server certificate does not name {address.host!r} (it names {named}); "
                "configure the server by a name its certificate carries")
    if "certificate verify failed" in text or "unknown ca" in text.lower():
        return "the server certificate is not signed by the configured CA (ca_pem / ca_file)"
    return _short(exc)


def _short(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return text if len(text) < 300 else text[:300] + "..."


class Pool:
    """The configured servers, primary first; remembers which one last worked.

    `connect()` tries every server once, starting with the current one. An
    authentication or TLS failure is raised at once only if no server works,
    so one misconfigured replica does not stop the directory.
    """

    def __init__(self, config: DirectoryConfig):
        self.config = config
        self.current = 0

    def order(self) -> Iterator[tuple[int, ServerAddress]]:
        n = len(self.config.servers)
        for i in range(n):
            idx = (self.current + i) % n
            yield idx, self.config.servers[idx]

    def connect(self, user: str | None = None, password: str | None = None,
                strategy=ldap3.SYNC, skip: int | None = None) -> ldap3.Connection:
        """A bound connection to the first server that works (skipping index `skip`)."""
        failures: list[DirectoryError] = []
        for idx, address in self.order():
            if idx == skip and len(self.config.servers) > 1:
                continue
            try:
                conn = open_connection(self.config, address, user, password, strategy)
            except DirectoryError as exc:
                if exc.code == "bind_failed" and user is not None:
                    raise  # a user's own bind: same answer on every server
                failures.append(exc)
                continue
            self.current = idx
            if user is None and strategy == ldap3.SYNC and not self.config.syntaxes.tried:
                self.config.syntaxes.load(conn)  # once per directory: which attributes are binary
            return conn
        raise _worst(failures, self.config)

    def failover(self) -> ldap3.Connection:
        """After the current server failed mid-operation: connect to another one."""
        failed = self.current
        conn = self.connect(skip=failed)
        return conn


def _worst(failures: list[DirectoryError], config: DirectoryConfig) -> DirectoryError:
    """One error for "no server worked", the most actionable first."""
    for code in ("bind_failed", "tls", "server_down"):
        for f in failures:
            if f.code == code:
                detail = "; ".join(f"{x.server}: {x.message}" for x in failures)
                return DirectoryError(code, f"no server of directory {config.name!r} usable: {detail}",
                                      f.server, f.reason)
    return failures[0] if failures else DirectoryError("server_down", "no servers configured")


def check_result(conn: ldap3.Connection, what: str) -> dict:
    """Raise the right DirectoryError for a failed search/modify result."""
    res = conn.result or {}
    code = res.get("result", 0)
    where = f"{conn.server.host}:{conn.server.port}"
    if code in (0, 10):  # success, referral (ignored: we never chase)
        return res
    if code == 4:
        raise DirectoryError("size_limit", f"{what}: the server stopped after its size limit "
                             f"({res.get('message') or 'sizeLimitExceeded'})", where, res.get("message"))
    if code == 87:
        raise DirectoryError("bad_filter", f"{what}: the server rejected the filter", where, res.get("message"))
    if code in (51, 52, 80, 81):  # busy, unavailable, other, server down
        raise DirectoryError("server_down", f"{what}: server busy or unavailable ({res.get('description')})",
                             where, res.get("message"))
    raise DirectoryError("operation_failed", f"{what}: {res.get('description')}", where, res.get("message"))
