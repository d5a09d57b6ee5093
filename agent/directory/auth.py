"""Authentication for home's identity provider: bind as the user, say why it failed.

Why bind (not compare hashes): the directory stays the authority for
passwords, lockout and expiry. The outcomes are distinct so home can tell a
user "your account is locked" instead of "wrong password":
success, wrong_password, disabled, locked, expired, unknown_user.

OpenLDAP: the ppolicy response control on the bind tells locked/expired; an
administrative lock (pwdAccountLockedTime = 000001010000Z, what `disable`
writes) is reported as disabled. AD/Samba: the "data NNN" code in the bind
error (52e, 533, 775, 532, 701, 773) tells which.
"""

from __future__ import annotations

import re
import threading

from ldap3.utils.conv import escape_filter_chars

from .config import DirectoryConfig
from .connection import DOWN_ERRORS, Pool, check_result
from .errors import DirectoryError
from . import requestber
from .groups import groups_of
from .mapping import ADMIN_LOCK  # noqa: F401 (provision.py imports it from here)

PPOLICY_OID = "1.3.6.1.4.1.42.2.27.8.5.1"
AD_CODES = {"52e": "wrong_password", "525": "unknown_user", "530": "disabled", "531": "disabled",
            "533": "disabled", "775": "locked", "532": "expired", "701": "expired", "773": "expired"}
OUTCOMES = ("success", "wrong_password", "disabled", "locked", "expired", "unknown_user")


def ppolicy_error(value: bytes | None) -> int | None:
    """The `error` field of a PasswordPolicyResponseValue (BER), or None.

    SEQUENCE { warning [0] EXPLICIT CHOICE OPTIONAL, error [1] IMPLICIT ENUMERATED OPTIONAL }
    """
    if not value or value[0] != 0x30:
        return None
    i, end = 2, 2 + value[1]
    if value[1] & 0x80:  # long-form length (never in practice for this tiny value)
        n = value[1] & 0x7F
        i, end = 2 + n, 2 + n + int.from_bytes(value[2:2 + n], "big")
    while i + 1 < min(end, len(value)):
        tag, length = value[i], value[i + 1]
        body = value[i + 2:i + 2 + length]
        if tag == 0x81:
            return int.from_bytes(body, "big")
        i += 2 + length
    return None


def find_user(config: DirectoryConfig, conn, username: str) -> dict | None:
    """The user's entry (dn + raw attributes) by login name, or None if unknown."""
    flt = f"(&{config.user_filter}({config.login_attribute}={escape_filter_chars(username)}))"
    attrs = ["pwdAccountLockedTime"] if config.kind == "openldap" else ["userAccountControl"]
    hits = []
    for base in config.base_dns:
        requestber.search(conn, base, flt, attrs, size_limit=2)
        if (conn.result or {}).get("result") == 32:
            continue
        check_result(conn, f"looking up user {username!r}")
        hits += [e for e in conn.response if e.get("type") == "searchResEntry"]
    if len(hits) > 1:
        raise DirectoryError("operation_failed", f"{len(hits)} entries match login {username!r} "
                             f"({config.login_attribute}); make login_attribute unique")
    return hits[0] if hits else None


def _classify_failure(config: DirectoryConfig, result: dict, entry: dict) -> str:
    if config.kind == "ad":
        m = re.search(r"data ([0-9a-f]{3})", result.get("message") or "")
        return AD_CODES.get(m.group(1), "wrong_password") if m else "wrong_password"
    control = (result.get("controls") or {}).get(PPOLICY_OID) or {}
    error = ppolicy_error(control.get("value"))
    locked_time = [v.decode() if isinstance(v, bytes) else v
                   for v in entry["raw_attributes"].get("pwdAccountLockedTime", [])]
    if ADMIN_LOCK in locked_time:
        return "disabled"
    if error == 1:
        return "locked"
    if error in (0, 2):  # passwordExpired, changeAfterReset
        return "expired"
    return "wrong_password"


class Authenticator:
    """Keeps a service connection (look-ups) and a bind connection (user binds) open.

    Why: the TLS handshake is most of the cost of a login; LDAP allows binding
    again on an open connection, so each login costs a search and a bind, not
    two handshakes. On a dropped connection both are replaced (on the next
    pool server if need be) and the login is tried once more. Not thread-safe:
    use one Authenticator per worker.
    """

    def __init__(self, config: DirectoryConfig, pool: Pool | None = None):
        self.config = config
        self.pool = pool or Pool(config)
        self.service = None
        self.binder = None

    def authenticate(self, username: str, password: str, with_groups: bool = True) -> dict:
        for attempt in (1, 2):
            try:
                if self.service is None or self.service.closed:
                    self.close()
                    self.service = self.pool.connect()
                    self.binder = self.pool.connect()  # same server: pool.current did not move
                return _authenticate(self.config, self.pool, self.service, self.binder,
                                     username, password, with_groups)
            except DOWN_ERRORS:
                self.close()
                if attempt == 2:
                    raise DirectoryError("server_down", "the directory stopped answering during "
                                         "authentication", str(self.config.servers[self.pool.current]))
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in (self.service, self.binder):
            if conn is not None:
                try:
                    conn.unbind()
                except Exception:
                    pass
        self.service = self.binder = None


class AuthPool:
    """At most `size` Authenticators, each used by one thread at a time.

    Why a pool: one Authenticator serves one login at a time (search, bind,
    group look-up are round trips on its two connections), so a directory
    behind a single one answers logins one after the other however many
    arrive; the server handles many binds at once. Why bounded (config
    `auth_connections`): every Authenticator holds two connections to the
    directory, and an identity provider's burst must not open hundreds.

    Authenticators are made when first needed and kept; one whose call raised
    anything but a directory answer is closed (its connections may be half way
    through an exchange) and reconnects on its next use. A caller beyond
    `size` waits for a free one. Outcomes are the Authenticator's, unchanged.
    """

    def __init__(self, config: DirectoryConfig, pool: Pool | None = None, size: int | None = None):
        self.config = config
        self.pool = pool or Pool(config)
        self.size = size or config.auth_connections
        self._free = threading.BoundedSemaphore(self.size)
        self._lock = threading.Lock()
        self._idle: list[Authenticator] = []
        self._made = 0
        self._closed = False

    def authenticate(self, username: str, password: str, with_groups: bool = True) -> dict:
        with self._free:
            auth = self._take()
            ok = False
            try:
                result = auth.authenticate(username, password, with_groups)
                ok = True
                return result
            except DirectoryError:
                ok = True  # an answer (server down, ambiguous login...): the connections are sound
                raise      # or already closed by the Authenticator
            finally:
                self._give(auth, keep=ok)

    def _take(self) -> Authenticator:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self._made += 1
        return Authenticator(self.config, self.pool)

    def _give(self, auth: Authenticator, keep: bool) -> None:
        with self._lock:
            if keep and not self._closed:
                self._idle.append(auth)
                return
        auth.close()

    def stats(self) -> dict:
        """Authenticators made so far and idle now (for tests and the agent's status)."""
        with self._lock:
            return {"size": self.size, "made": self._made, "idle": len(self._idle)}

    def close(self) -> None:
        """Close the idle Authenticators; ones in use are closed when their call returns."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for auth in idle:
            auth.close()


def authenticate(config: DirectoryConfig, username: str, password: str, pool: Pool | None = None,
                 with_groups: bool = True) -> dict:
    """Bind as `username`; return {'outcome', 'dn', 'groups', 'server', 'reason'} (one-shot)."""
    auth = Authenticator(config, pool)
    try:
        return auth.authenticate(username, password, with_groups)
    finally:
        auth.close()


def _authenticate(config: DirectoryConfig, pool: Pool, service, binder, username: str, password: str,
                  with_groups: bool) -> dict:
    if not username or not password:
        # an empty password would be an anonymous ("unauthenticated") bind that succeeds
        return {"outcome": "wrong_password", "reason": "empty user name or password"}
    entry = find_user(config, service, username)
    where = str(config.servers[pool.current])
    if entry is None:
        return {"outcome": "unknown_user", "server": where}
    dn = entry["dn"]
    controls = [(PPOLICY_OID, False, None)] if config.kind == "openldap" else None
    outcome, reason = _bind_as(config, pool, binder, dn, password, controls, entry)
    out = {"outcome": outcome, "dn": dn, "server": where}
    if reason:
        out["reason"] = reason
    if outcome == "success" and with_groups:
        out["groups"] = groups_of(config, service, dn)
    return out


def _bind_as(config, pool: Pool, binder, dn: str, password: str, controls, entry) -> tuple[str, str | None]:
    """Bind as `dn` on the open bind connection; classify a refusal."""
    ok = requestber.bind(binder, dn, password, controls)
    result = binder.result or {}
    if ok:
        return "success", None
    if result.get("result") in (51, 52, 80):
        raise DirectoryError("server_down", f"bind as {dn!r}: server busy or unavailable",
                             str(config.servers[pool.current]), result.get("message"))
    if result.get("result") not in (49, 53):
        raise DirectoryError("operation_failed", f"bind as {dn!r}: {result.get('description')}",
                             str(config.servers[pool.current]), result.get("message"))
    return _classify_failure(config, result, entry), result.get("message") or result.get("description")
