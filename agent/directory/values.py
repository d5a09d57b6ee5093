"""Attribute values as the records carry them: text, base64, UUID or SID, never guessed.

Why decide per attribute and never by trying to decode: a JPEG or a GUID can
happen to be valid UTF-8, and text decoded with replacement characters is
lost for good. Which attributes are binary comes from the server's own schema
(the SYNTAX of each attribute type, following SUP), from the configuration's
``binary_attributes``, and, where the schema cannot be read, from a short list
of attributes that are binary on every server. Encodings in a record:

* ``text``   UTF-8 as the server sent it (the LDAP string syntaxes)
* ``base64`` standard base64 of the exact bytes (binary syntaxes)
* ``uuid``   objectGUID and other AD GUIDs: the canonical UUID string
* ``sid``    objectSid and other AD SIDs: ``S-1-5-21-...``

A value of a text attribute that is not UTF-8 is kept as base64 too (never
replaced by U+FFFD) and reported as a problem of its entry.
"""

from __future__ import annotations

import base64
import logging
import uuid

log = logging.getLogger("tether.agent.directory")

#: LDAP syntaxes whose values are bytes, not text (RFC 4517, RFC 4523, AD's OctetString)
BINARY_SYNTAXES = frozenset({
    "1.3.6.1.4.1.1466.115.121.1.4",   # Audio
    "1.3.6.1.4.1.1466.115.121.1.5",   # Binary
    "1.3.6.1.4.1.1466.115.121.1.8",   # Certificate
    "1.3.6.1.4.1.1466.115.121.1.9",   # Certificate List
    "1.3.6.1.4.1.1466.115.121.1.10",  # Certificate Pair
    "1.3.6.1.4.1.1466.115.121.1.23",  # Fax
    "1.3.6.1.4.1.1466.115.121.1.28",  # JPEG
    "1.3.6.1.4.1.1466.115.121.1.40",  # Octet String (AD: 2.5.5.10)
    "1.3.6.1.4.1.1466.115.121.1.49",  # Supported Algorithm
    "1.2.840.113556.1.4.907",         # AD: NT security descriptor
    "1.2.840.113556.1.4.906",         # AD: large integer as bytes (rare)
})
#: AD attributes with a canonical text form of their bytes
SPECIAL = {"objectguid": "uuid", "msexchmailboxguid": "uuid", "msds-consistencyguid": "uuid",
           "objectsid": "sid", "sidhistory": "sid", "tokengroups": "sid", "securityidentifier": "sid"}
#: binary on every server: used when the schema cannot be read
WELL_KNOWN_BINARY = frozenset({
    "jpegphoto", "thumbnailphoto", "photo", "audio", "usercertificate", "cacertificate",
    "usersmimecertificate", "userpkcs12", "certificaterevocationlist",
    "authorityrevocationlist", "crosscertificatepair", "logonhours", "ntsecuritydescriptor",
    "msds-generationid", "objectguid", "objectsid", "sidhistory", "tokengroups"})


def sid_text(data: bytes) -> str:
    """A binary SID as ``S-<rev>-<authority>-<sub>-...`` (MS-DTYP 2.4.2.2)."""
    if len(data) < 8 or len(data) != 8 + 4 * data[1]:
        raise ValueError(f"{len(data)} bytes are not a SID")
    authority = int.from_bytes(data[2:8], "big")
    subs = [int.from_bytes(data[8 + 4 * i:12 + 4 * i], "little") for i in range(data[1])]
    return "-".join(["S", str(data[0]), str(authority), *map(str, subs)])


def sid_bytes(text: str) -> bytes:
    """The inverse of :func:`sid_text` (tests and provisioning)."""
    parts = text.split("-")
    if len(parts) < 3 or parts[0] != "S":
        raise ValueError(f"{text!r} is not a SID (S-1-5-...)")
    subs = [int(p) for p in parts[3:]]
    return (bytes([int(parts[1]), len(subs)]) + int(parts[2]).to_bytes(6, "big")
            + b"".join(s.to_bytes(4, "little") for s in subs))


class Syntaxes:
    """Which attributes of one directory are binary; filled from its schema once.

    Why mutable inside the frozen config: every path that makes records (full
    and incremental sync, notifications, search, group lookup) shares the
    directory's configuration, and the schema is read on the first connection
    (``Pool.connect``) rather than by each of them.
    """

    def __init__(self, forced: tuple[str, ...] = ()) -> None:
        self.forced = frozenset(a.lower() for a in forced)
        self.binary: frozenset[str] = frozenset()
        self.names: frozenset[str] = frozenset()  # every attribute type the schema defines
        self.loaded = False
        self.tried = False

    def encoding(self, attr: str) -> str:
        low = attr.lower().split(";", 1)[0]
        if low in SPECIAL:
            return SPECIAL[low]
        if low in self.forced or low in self.binary:
            return "base64"
        if not self.loaded and low in WELL_KNOWN_BINARY:
            return "base64"
        return "text"

    def load(self, conn) -> None:
        """Read the subschema's attributeTypes; a server that hides them leaves the fallback."""
        self.tried = True
        try:
            conn.search("", "(objectClass=*)", search_scope="BASE", attributes=["subschemaSubentry"])
            root = conn.response[0]["raw_attributes"] if conn.response else {}
            sub = next((v for k, v in root.items() if k.lower() == "subschemasubentry"), [])
            if not sub:
                return
            conn.search(sub[0].decode(), "(objectClass=*)", search_scope="BASE",
                        attributes=["attributeTypes"])
            definitions = [v.decode("utf-8") for resp in conn.response or []
                           for k, vals in resp.get("raw_attributes", {}).items()
                           if k.lower() == "attributetypes" for v in vals]
        except Exception as exc:  # noqa: BLE001 - the schema is an aid: fall back, say so
            log.warning("reading the schema failed (%s); binary attributes from the built-in list",
                        exc)
            return
        if not definitions:
            return
        self.load_definitions(definitions)

    def load_definitions(self, definitions: list[str]) -> None:
        from ldap3.protocol.rfc4512 import AttributeTypeInfo
        infos = {k.lower(): v for k, v in AttributeTypeInfo.from_definition(definitions).items()}

        def syntax(name: str, depth: int = 0) -> str | None:
            info = infos.get(name)
            if info is None or depth > 20:
                return None
            if info.syntax:
                return str(info.syntax).split("{", 1)[0].strip("'")
            return syntax(info.superior[0].lower(), depth + 1) if info.superior else None

        self.names = frozenset(infos)
        self.binary = frozenset(n for n in infos if syntax(n) in BINARY_SYNTAXES)
        self.loaded = True


def encode(values: list, encoding: str) -> tuple[list[str], str, list[bytes]]:
    """(values as strings, the encoding actually used, values that were not valid text).

    A value of a ``text`` attribute that is not UTF-8 makes the whole
    attribute ``base64`` (one encoding per attribute and record) and is
    returned in the third item so the caller can report it.
    """
    raw = [v if isinstance(v, bytes) else str(v).encode() for v in values]
    if encoding == "uuid":
        try:
            return [str(uuid.UUID(bytes_le=bytes(v))) for v in raw], "uuid", []
        except ValueError:
            encoding = "base64"
    elif encoding == "sid":
        try:
            return [sid_text(bytes(v)) for v in raw], "sid", []
        except ValueError:
            encoding = "base64"
    if encoding == "text":
        try:
            return [bytes(v).decode("utf-8") for v in raw], "text", []
        except UnicodeDecodeError:
            bad = []
            for v in raw:
                try:
                    bytes(v).decode("utf-8")
                except UnicodeDecodeError:
                    bad.append(bytes(v))
            return [base64.b64encode(v).decode("ascii") for v in raw], "base64", bad
    return [base64.b64encode(v).decode("ascii") for v in raw], "base64", []
