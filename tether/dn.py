"""Distinguished names compared by meaning (RFC 4514 string form, RFC 4518 matching).

Why this module: a directory hands back the same DN in different spellings.
slapd returns an entry's DN in its own escaped form (``cn=Smith\\2C John``)
while a ``member`` value keeps the spelling it was written with
(``cn=Smith\\, John``); clients differ in the case of attribute types, spaces
around ``=`` and ``,``, hex escapes of UTF-8 versus raw UTF-8, the order of the
parts of a multi-valued RDN (``cn=a+uid=b``), OIDs instead of names. Matching
members, renames, moves and deletes by the lower-cased string loses every one
of those. Both the agent and home match DNs only through :func:`key`.

Why not a library: ldap3's ``parse_dn`` splits a DN but leaves every escape
undecoded (``\\2C`` and ``\\,`` stay different) and has no notion of equality;
python-ldap's ``str2dn`` needs libldap's C library, which the appliance does
not carry. The grammar is small; this parser follows RFC 4514 section 3 and
accepts the older spellings slapd accepts too (spaces around ``=``, ``,`` and
``+``, ``;`` as a separator, ``"quoted"`` values, ``oid.`` prefixes).

Matching: attribute types are case-insensitive and OIDs / long names map to
the short name (``2.5.4.3`` = ``commonName`` = ``cn``). Values compare as
caseIgnoreMatch does (RFC 4518): case folded, NFKC, every run of spaces one
space, no leading or trailing space. That is the equality rule of every naming
attribute of users, groups and containers in OpenLDAP's and AD's schemas (cn,
uid, ou, o, dc, c, l, st, sAMAccountName...); AD compares every DN that way.
A ``#hex`` value (BER) of a string type compares as that string; any other
``#hex`` value compares byte for byte.
"""

from __future__ import annotations

import functools
import re
import unicodedata

__all__ = ["DNError", "parse", "key", "same", "within", "rdn_value", "split_rdn"]


class DNError(ValueError):
    """Not a distinguished name in the RFC 4514 string form; the message says where."""


#: long names and OIDs of the attributes seen in DNs -> their short name (lower case)
_ALIASES = {
    "commonname": "cn", "2.5.4.3": "cn",
    "surname": "sn", "2.5.4.4": "sn",
    "serialnumber": "serialnumber", "2.5.4.5": "serialnumber",
    "countryname": "c", "2.5.4.6": "c",
    "localityname": "l", "2.5.4.7": "l",
    "stateorprovincename": "st", "2.5.4.8": "st",
    "streetaddress": "street", "2.5.4.9": "street",
    "organizationname": "o", "2.5.4.10": "o",
    "organizationalunitname": "ou", "2.5.4.11": "ou",
    "2.5.4.12": "title", "2.5.4.13": "description", "2.5.4.17": "postalcode",
    "2.5.4.41": "name", "gn": "givenname", "2.5.4.42": "givenname", "2.5.4.43": "initials",
    "2.5.4.46": "dnqualifier",
    "userid": "uid", "0.9.2342.19200300.100.1.1": "uid",
    "domaincomponent": "dc", "0.9.2342.19200300.100.1.25": "dc",
    "rfc822mailbox": "mail", "0.9.2342.19200300.100.1.3": "mail",
    "emailaddress": "email", "1.2.840.113549.1.9.1": "email",
    "2.16.840.1.113730.3.1.3": "employeenumber", "2.16.840.1.113730.3.1.241": "displayname",
    "1.2.840.113556.1.4.221": "samaccountname", "1.3.6.1.1.16.4": "entryuuid",
    "1.3.6.1.1.1.1.0": "uidnumber", "1.3.6.1.1.1.1.1": "gidnumber",
}
_SPECIAL = frozenset(',+"\\<>;=#')
_HEX = frozenset("0123456789abcdefABCDEF")
_ESCAPE_KEY = {ord(c): f"\\{ord(c):02x}" for c in _SPECIAL}
#: BER tags of the string types a ``#hex`` value may hold, and how to read them
_BER_STRINGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1",
                0x1E: "utf-16-be", 0x1C: "utf-32-be", 0x1A: "ascii"}


def _type(text: str, dn: str) -> str:
    name = text.strip()
    low = name.lower()
    if low.startswith("oid."):
        low = low[4:]
    if not low:
        raise DNError(f"DN {dn!r}: an attribute type is missing before '='")
    if low[0].isdigit():
        parts = low.split(".")
        if len(parts) < 2 or not all(p.isdigit() and (p == "0" or p[0] != "0") for p in parts):
            raise DNError(f"DN {dn!r}: {name!r} is not an attribute type (name or numeric OID)")
    elif not (low[0].isascii() and low[0].isalpha()
              and all(c.isascii() and (c.isalnum() or c == "-") for c in low)):
        raise DNError(f"DN {dn!r}: {name!r} is not an attribute type (letters, digits, '-')")
    return _ALIASES.get(low, low)


def _ber_value(hexstr: str, dn: str) -> str | bytes:
    """A ``#hex`` value: the string it encodes, or its bytes when not a string type."""
    if not hexstr or len(hexstr) % 2 or not set(hexstr) <= _HEX:
        raise DNError(f"DN {dn!r}: '#{hexstr}' is not an even number of hex digits")
    data = bytes.fromhex(hexstr)
    if len(data) >= 2 and data[0] in _BER_STRINGS:
        n, i = data[1], 2
        if n & 0x80:
            width = n & 0x7F
            n, i = int.from_bytes(data[2:2 + width], "big"), 2 + width
        if i + n == len(data):
            try:
                return data[i:].decode(_BER_STRINGS[data[0]])
            except UnicodeDecodeError:
                pass
    return data


def parse(dn: str) -> list[list[tuple[str, str | bytes]]]:
    """The RDNs of `dn`, most specific first, each a list of (type, value) in written order.

    Types are canonical (short name, lower case); values have every escape
    decoded (a ``#hex`` BER value of a non-string type stays bytes). Raises
    :class:`DNError` for anything that is not a DN. ``""`` (the root) is ``[]``.
    """
    if not isinstance(dn, str):
        raise DNError(f"a DN must be text, not {type(dn).__name__}")
    n, i = len(dn), 0
    rdns: list[list[tuple[str, str | bytes]]] = []
    rdn: list[tuple[str, str | bytes]] = []
    if not dn.strip():
        return []
    while True:
        eq = dn.find("=", i)
        if eq < 0:
            raise DNError(f"DN {dn!r}: {dn[i:]!r} has no '=' (each part is type=value)")
        atype = _type(dn[i:eq], dn)
        i = eq + 1
        while i < n and dn[i] == " ":
            i += 1
        value: str | bytes
        if i < n and dn[i] == "#":
            j = i + 1
            while j < n and dn[j] not in ",+; ":
                j += 1
            value = _ber_value(dn[i + 1:j], dn)
            i = j
        elif i < n and dn[i] == '"':
            out = bytearray()
            i += 1
            while True:
                if i >= n:
                    raise DNError(f"DN {dn!r}: a quoted value is not closed")
                c = dn[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\":
                    i = _escape(dn, i, out)
                    continue
                out += c.encode()
                i += 1
            value = _utf8(out, dn)
        else:
            out = bytearray()
            keep = 0  # length of `out` up to the last escaped or non-space byte
            while i < n:
                run = _RUN.match(dn, i)
                if run:  # a stretch of ordinary characters at once
                    chunk = run.group()
                    stripped = chunk.rstrip(" ")
                    if stripped:
                        keep = len(out) + len(stripped.encode())
                    out += chunk.encode()
                    i = run.end()
                    if i >= n:
                        break
                c = dn[i]
                if c in ",+;":
                    break
                if c == "\\":
                    i = _escape(dn, i, out)
                    keep = len(out)
                    continue
                raise DNError(f"DN {dn!r}: {c!r} must be escaped in a value (\\{ord(c):02X})")
            value = _utf8(bytes(out[:keep]), dn)  # unescaped trailing spaces are not part of it
        while i < n and dn[i] == " ":
            i += 1
        rdn.append((atype, value))
        if i >= n:
            rdns.append(rdn)
            return rdns
        sep = dn[i]
        if sep not in ",+;":
            raise DNError(f"DN {dn!r}: unexpected {sep!r} after a value (escape it as \\{ord(sep):02X})")
        if sep != "+":
            rdns.append(rdn)
            rdn = []
        i += 1
        if i >= n or not dn[i:].strip():
            raise DNError(f"DN {dn!r}: ends with {sep!r}; a type=value must follow")


def _escape(dn: str, i: int, out: bytearray) -> int:
    """Decode the escape at dn[i] ('\\') into `out`; return the index after it."""
    if i + 1 >= len(dn):
        raise DNError(f"DN {dn!r}: ends with a lone '\\'")
    c = dn[i + 1]
    if c in _HEX and i + 2 < len(dn) and dn[i + 2] in _HEX:
        out.append(int(dn[i + 1:i + 3], 16))
        return i + 3
    if c in _SPECIAL or c == " ":
        out += c.encode()
        return i + 2
    raise DNError(f"DN {dn!r}: '\\{c}' is not an escape (use \\ before one of , + \" \\ < > ; = # "
                  "space, or two hex digits)")


def _utf8(data: bytes, dn: str) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise DNError(f"DN {dn!r}: a value's hex escapes are not UTF-8") from None


def _fold(value: str | bytes) -> str:
    """caseIgnoreMatch's prepared form (RFC 4518), escaped so that keys never collide."""
    if isinstance(value, bytes):
        return "#" + value.hex()
    if value.isascii() and value.isprintable():  # nothing for NFKC or control removal to do
        text = " ".join(value.lower().split())
    else:
        text = unicodedata.normalize("NFKC", value.casefold())
        text = " ".join("".join(" " if ch.isspace() else ch for ch in text
                                if unicodedata.category(ch) != "Cc" or ch.isspace()).split())
    return text.translate(_ESCAPE_KEY)


#: anything that needs the full parser (escapes, quotes, multi-valued RDNs, BER, controls)
_NOT_PLAIN = re.compile(r'[\\"+#;<>\x00-\x1f\x7f]')
_DESCR = re.compile(r"[a-z][a-z0-9-]*")
_RUN = re.compile(r'[^,+;\\"<>\x00]+')
#: (first RDN, parent) of a DN without quotes, split at the first unescaped comma
_FIRST_RDN = re.compile(r'((?:[^\\,"]|\\.)+),(.+)', re.S)


@functools.lru_cache(maxsize=1 << 16)
def key(dn: str) -> str:
    """The canonical comparison key of `dn`: equal keys <=> the same entry.

    Multi-valued RDNs are sorted, types canonical, values folded; the key is a
    DN string itself (``cn=smith\\2c john,dc=example``) so a suffix test on
    keys is a subtree test. Raises :class:`DNError` for a malformed DN.

    Why two paths: home keys every entry and member DN it stores; most DNs are
    plain ASCII without escapes, which a split handles at a fraction of the
    parser's cost (tests check that both paths agree).
    """
    if dn.isascii() and not _NOT_PLAIN.search(dn):
        plain = _plain_key(dn)
        if plain is not None:
            return plain
    split = _FIRST_RDN.match(dn)
    # the parent is shared by many DNs: its key comes from the cache (a blank part is
    # an empty RDN, which only the whole DN's parse refuses)
    if split is not None and not split[1].isspace() and not split[2].isspace():
        try:
            return f"{_full_key(split[1])},{key(split[2])}"
        except DNError:
            pass  # the whole DN's parse says why, naming the whole DN
    return _full_key(dn)


def _full_key(dn: str) -> str:
    return ",".join("+".join(sorted(f"{t}={_fold(v)}" for t, v in rdn)) for rdn in parse(dn))


def _plain_key(dn: str) -> str | None:
    """Key of an ASCII DN without escapes or '+'; None: let the full parser decide.

    Why the parent apart: the DNs of one directory share a few parents
    (``ou=people,dc=example,dc=org``), so only the first RDN is new work.
    """
    first, comma, parent = dn.partition(",")
    atype, sep, value = first.partition("=")
    atype = atype.strip().lower()
    if not sep or not _DESCR.fullmatch(atype):
        return None  # OIDs, empty parts, errors: the parser explains
    value = value.lower()
    if " " in value:  # the only whitespace a plain DN can hold
        value = " ".join(value.split())
    if "=" in value:
        value = value.replace("=", "\\3d")
    head = f"{_ALIASES.get(atype, atype)}={value}"
    if not comma:
        return head
    rest = _plain_parent_key(parent)
    return None if rest is None else f"{head},{rest}"


@functools.lru_cache(maxsize=1 << 10)
def _plain_parent_key(dn: str) -> str | None:
    return _plain_key(dn)


def same(a: str, b: str) -> bool:
    """Do DNs `a` and `b` name the same entry? (A malformed one names nothing.)"""
    try:
        return key(a) == key(b)
    except DNError:
        return False


def within(dn: str, base: str) -> bool:
    """Is `dn` the entry `base` or below it?"""
    try:
        k, b = key(dn), key(base)
    except DNError:
        return False
    return k == b or not b or k.endswith("," + b)


def rdn_value(dn: str) -> str:
    """The (first) value of the most specific RDN, unescaped: 'cn=Smith\\, John,dc=x' -> 'Smith, John'."""
    rdns = parse(dn)
    if not rdns:
        raise DNError("the root DN has no RDN")
    value = rdns[0][0][1]
    return value if isinstance(value, str) else "#" + value.hex()


def split_rdn(dn: str) -> tuple[str, str]:
    """(first RDN, parent DN) as written: 'cn=Smith\\, John,ou=x' -> ('cn=Smith\\, John', 'ou=x').

    Why: a rename or move builds the new DN from the parent; ``dn.split(",", 1)``
    cuts inside an escaped comma. Raises :class:`DNError` for a malformed DN.
    """
    parse(dn)  # validate first: the scan below trusts the grammar
    i, n, quoted = 0, len(dn), False
    while i < n:
        c = dn[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c in ",;" and not quoted:
            return dn[:i].strip(), dn[i + 1:].strip()
        i += 1
    return dn.strip(), ""
