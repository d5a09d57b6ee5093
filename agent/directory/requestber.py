"""The login path's LDAP requests (search, simple bind) encoded in one pass, without pyasn1.

Why: every login through an agent is a user look-up search, a bind, and (with
groups) a search per nesting level. Through ldap3 each request is first built
as a tree of pyasn1 objects, encoded by pyasn1's generic BER encoder and then
decoded back into a dict for `connection.request`: measured, 0.23 ms of CPU for
one bind request and more for a search, about half of the agent's CPU per
login. Here the same bytes are written directly (tests compare them with
ldap3's for every filter form and option), then ldap3's own strategy reads the
answer, so results, referrals, errors and timeouts are handled exactly as for
`Connection.search` / `Connection.bind`. `wire.py` does the same for the
receive side of bulk reads.

Only what RFC 4515 allows is encoded here; a filter this strict parser does not
accept (ldap3 repairs some, e.g. an unescaped parenthesis) raises
FilterNotHandled and the caller's request goes through ldap3 unchanged.
"""

from __future__ import annotations

import re

import ldap3
from ldap3.core.exceptions import LDAPSocketOpenError, LDAPSocketSendError, communication_exception_factory
from ldap3.protocol.sasl.sasl import validate_simple_password

from .wire import FastSyncStrategy

_SCOPES = {ldap3.BASE: 0, ldap3.LEVEL: 1, ldap3.SUBTREE: 2}
_DEREF = {ldap3.DEREF_NEVER: 0, ldap3.DEREF_SEARCH: 1, ldap3.DEREF_BASE: 2, ldap3.DEREF_ALWAYS: 3}
# attribute description (RFC 4512): a descriptor or a numeric OID, then options
_ATTRIBUTE = re.compile(r"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*)(?:;[A-Za-z0-9-]+)*\Z")
_RULE = re.compile(r"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*)\Z")
_HEX = frozenset("0123456789abcdefABCDEF")
_SIMPLE_TAGS = {"~": 0xA8, ">": 0xA5, "<": 0xA6}


class FilterNotHandled(ValueError):
    """The filter is not strict RFC 4515: let ldap3 parse (and perhaps repair) it."""


# --- BER ----------------------------------------------------------------------------
def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + _length(len(body)) + body


def _integer(tag: int, n: int) -> bytes:
    """A non-negative INTEGER or ENUMERATED in its shortest two's-complement form."""
    return tlv(tag, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def _octets(text: str | bytes, tag: int = 0x04) -> bytes:
    return tlv(tag, text.encode("utf-8") if isinstance(text, str) else text)


def _boolean(value: bool) -> bytes:
    return tlv(0x01, b"\xff" if value else b"\x00")


# --- filters (RFC 4515 -> RFC 4511 Filter) ------------------------------------------
def encode_filter(text: str) -> bytes:
    """The BER of a filter string; FilterNotHandled if it is not strict RFC 4515."""
    body, end = _filter(text, 0)
    if end != len(text):
        raise FilterNotHandled(text)
    return body


def _filter(s: str, i: int) -> tuple[bytes, int]:
    if s[i:i + 1] != "(":
        raise FilterNotHandled(s)
    kind = s[i + 1:i + 2]
    if kind in ("&", "|"):
        j, parts = i + 2, []
        while s[j:j + 1] == "(":
            part, j = _filter(s, j)
            parts.append(part)
        if not parts or s[j:j + 1] != ")":
            raise FilterNotHandled(s)
        return tlv(0xA0 if kind == "&" else 0xA1, b"".join(parts)), j + 1
    if kind == "!":
        part, j = _filter(s, i + 2)
        if s[j:j + 1] != ")":
            raise FilterNotHandled(s)
        return tlv(0xA2, part), j + 1
    end = s.find(")", i + 1)
    item = s[i + 1:end]
    if end < 0 or "(" in item:
        raise FilterNotHandled(s)
    return _item(item), end + 1


def _attribute(name: str) -> bytes:
    if not _ATTRIBUTE.match(name):
        raise FilterNotHandled(name)
    return _octets(name)


def _value(text: str) -> bytes:
    """An assertion value with its \\XX escapes resolved; unescaped ( ) * \\ NUL are not allowed.

    ldap3 strips white space around a value before sending it; such values are
    left to ldap3 so the bytes stay the same.
    """
    if text != text.strip():
        raise FilterNotHandled(text)
    if "\\" not in text:
        if "*" in text or "\x00" in text:
            raise FilterNotHandled(text)
        return text.encode("utf-8")
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            pair = text[i + 1:i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise FilterNotHandled(text)
            out.append(int(pair, 16))
            i += 3
            continue
        if c in "*\x00":
            raise FilterNotHandled(text)
        out += c.encode("utf-8")
        i += 1
    return bytes(out)


def _item(item: str) -> bytes:
    eq = item.find("=")
    if eq <= 0:
        raise FilterNotHandled(item)
    left, value = item[:eq], item[eq + 1:]
    if left.endswith(":"):
        return _extensible(left[:-1], value)
    if left[-1] in _SIMPLE_TAGS:
        return tlv(_SIMPLE_TAGS[left[-1]], _attribute(left[:-1]) + _octets(_value(value)))
    attribute = _attribute(left)
    if value == "*":
        return tlv(0x87, left.encode("utf-8"))
    if "*" not in value:
        return tlv(0xA3, attribute + _octets(_value(value)))
    pieces = value.split("*")
    if any(p == "" for p in pieces[1:-1]):
        raise FilterNotHandled(item)  # "**": an empty middle substring
    parts = []
    if pieces[0]:
        parts.append(_octets(_value(pieces[0]), 0x80))
    parts += [_octets(_value(p), 0x81) for p in pieces[1:-1]]
    if pieces[-1]:
        parts.append(_octets(_value(pieces[-1]), 0x82))
    return tlv(0xA4, attribute + tlv(0x30, b"".join(parts)))


def _extensible(left: str, value: str) -> bytes:
    """attr[:dn][:rule]:=value or [:dn]:rule:=value (RFC 4515 extensible match)."""
    fields = left.split(":")
    attribute, rest = fields[0], fields[1:]
    dn_attributes = bool(rest) and rest[0].lower() == "dn"
    if dn_attributes:
        rest = rest[1:]
    if len(rest) > 1 or (rest and not _RULE.match(rest[0])) or (not attribute and not rest):
        raise FilterNotHandled(left)
    body = _octets(rest[0], 0x81) if rest else b""
    if attribute:
        if not _ATTRIBUTE.match(attribute):
            raise FilterNotHandled(left)
        body += _octets(attribute, 0x82)
    body += _octets(_value(value), 0x83)
    if dn_attributes:  # DEFAULT FALSE: written only when true
        body += tlv(0x84, b"\xff")
    return tlv(0xA9, body)


# --- messages -----------------------------------------------------------------------
def _message(message_id: int, operation: bytes, controls) -> bytes:
    body = _integer(0x02, message_id) + operation
    if controls:
        encoded = b""
        for oid, critical, value in controls:
            control = _octets(oid) + (_boolean(True) if critical else b"")  # DEFAULT FALSE
            if value is not None:
                control += _octets(value)
            encoded += tlv(0x30, control)
        body += tlv(0xA0, encoded)
    return tlv(0x30, body)


def search_request(message_id: int, base: str, filter_ber: bytes, attributes: list[str],
                   scope: str = ldap3.SUBTREE, dereference: str = ldap3.DEREF_ALWAYS,
                   size_limit: int = 0, time_limit: int = 0, types_only: bool = False,
                   controls=None) -> bytes:
    """One LDAPMessage holding a SearchRequest ([APPLICATION 3])."""
    body = (_octets(base) + _integer(0x0A, _SCOPES[scope]) + _integer(0x0A, _DEREF[dereference])
            + _integer(0x02, size_limit) + _integer(0x02, time_limit) + _boolean(types_only)
            + filter_ber + tlv(0x30, b"".join(_octets(a) for a in attributes)))
    return _message(message_id, tlv(0x63, body), controls)


def bind_request(message_id: int, dn: str, password: str | bytes, controls=None) -> bytes:
    """One LDAPMessage holding a simple BindRequest ([APPLICATION 0]), version 3.

    The password goes through ldap3's own SASLprep (validate_simple_password),
    so the bytes on the wire are the ones ldap3 would send.
    """
    secret = validate_simple_password(password)
    body = _integer(0x02, 3) + _octets(dn) + _octets(secret, 0x80)
    return _message(message_id, tlv(0x60, body), controls)


# --- sending through ldap3's strategy -------------------------------------------------
def _fast(conn: ldap3.Connection) -> bool:
    return isinstance(conn.strategy, FastSyncStrategy) and not conn.sasl_mechanism and conn.fast_decoder


def _send(conn: ldap3.Connection, message_id: int, encoded: bytes, request: dict) -> list:
    """Send `encoded` as ldap3's `send` would and return its responses (the result last)."""
    strategy = conn.strategy
    if not conn.listening:
        conn.last_error = "unable to send message, socket is not open"
        raise LDAPSocketOpenError(conn.last_error)
    conn.request = request
    strategy._outstanding[message_id] = request
    try:
        conn.socket.sendall(encoded)
    except OSError as exc:
        conn.last_error = "socket sending error" + str(exc)
        raise communication_exception_factory(LDAPSocketSendError, type(exc)(str(exc)))(conn.last_error)
    if conn.usage:
        conn._usage.update_transmitted_message(request, len(encoded))
    return strategy.post_send_search(message_id) if request["type"] == "searchRequest" \
        else strategy.post_send_single_response(message_id)


def search(conn: ldap3.Connection, base: str, search_filter: str, attributes: list[str],
           size_limit: int = 0) -> None:
    """`conn.search(base, search_filter, attributes=..., size_limit=...)`, entries as raw bytes.

    Sets conn.result and conn.response as ldap3 does; entries carry `dn` and
    `raw_attributes` (wire.parse_entry), which is all the login path reads.
    """
    try:
        filter_ber = encode_filter(search_filter) if _fast(conn) else None
    except FilterNotHandled:
        filter_ber = None
    if filter_ber is None:
        conn.search(base, search_filter, attributes=attributes, size_limit=size_limit)
        return
    message_id = conn.server.next_message_id()
    request = {"type": "searchRequest", "base": base, "scope": 2, "dereferenceAlias": 3,
               "sizeLimit": size_limit, "timeLimit": 0, "typesOnly": False, "filter": search_filter,
               "attributes": list(attributes), "controls": None}
    conn.strategy.raw_entries = True
    try:
        _send(conn, message_id, search_request(message_id, base, filter_ber, attributes,
                                               size_limit=size_limit), request)
    finally:
        conn.strategy.raw_entries = False


def bind(conn: ldap3.Connection, dn: str, password: str, controls=None) -> bool:
    """A simple bind as `dn` on the open `conn` (ldap3's `conn.bind()` after setting user/password)."""
    conn.user, conn.password = dn, password
    if not _fast(conn) or not dn or not password or conn.closed:
        return conn.bind(controls=controls)
    message_id = conn.server.next_message_id()
    request = {"type": "bindRequest", "version": 3, "name": dn, "controls": controls}
    _send(conn, message_id, bind_request(message_id, dn, password, controls), request)
    result = conn.result or {}
    conn.bound = result.get("result") == 0
    return conn.bound
