"""Turn raw directory entries into the plain records sent home.

Why separate: the same record shape comes out of full sync, incremental sync
and notifications, for OpenLDAP and AD alike, so home needs one parser. A
record is keyed by the directory's immutable id (entryUUID / objectGUID),
never by DN, so renames and moves are updates, not delete + add.
"""

from __future__ import annotations

import uuid

from .config import DirectoryConfig
from . import values as values_mod
from .errors import DirectoryError

ID_ATTRIBUTE = {"openldap": "entryUUID", "ad": "objectGUID"}
#: OpenLDAP ppolicy's administrative lock (a pwdAccountLockedTime that never expires):
#: what `disable_user` writes, so a synced OpenLDAP user is `disabled` when it holds it
ADMIN_LOCK = "000001010000Z"


def id_attribute(config: DirectoryConfig) -> str:
    return ID_ATTRIBUTE[config.kind]


def search_attributes(config: DirectoryConfig, kind: str) -> list[str]:
    """The attributes a sync must request for users or groups."""
    mapping = config.user_mapping if kind == "user" else config.group_mapping
    attrs = {id_attribute(config), "objectClass", *mapping.values()}
    if kind == "group":
        # AD: members in pages when asked (ranges.py); the answer is merged back to the name
        attrs.add(f"{config.member_attribute};range=0-{config.member_range_size - 1}"
                  if config.member_range_size else config.member_attribute)
    elif config.kind == "ad":
        attrs.add("userAccountControl")
    else:
        attrs.add("pwdAccountLockedTime")  # operational: returned only when asked for
    if kind == "user" and config.sync_password_hashes:
        attrs.add("userPassword")
    return sorted(attrs)


def entry_id(config: DirectoryConfig, raw: dict) -> str:
    """The immutable id of an entry from its raw attribute values."""
    values = raw.get(id_attribute(config)) or raw.get(id_attribute(config).lower())
    if not values:
        raise DirectoryError("operation_failed", f"entry has no {id_attribute(config)}")
    value = values[0]
    if config.kind == "ad":
        return str(uuid.UUID(bytes_le=bytes(value)))
    return value.decode() if isinstance(value, bytes) else str(value)


def _text(values: list) -> list[str]:
    """Values of attributes that are text by definition (objectClass, DNs, flags).

    Lossless: bytes that are not UTF-8 become RFC 4514 hex escapes (``\\ff``), so a
    broken DN value reaches home as it was and home reports it (tether.dn refuses it).
    """
    out = []
    for v in values:
        if not isinstance(v, bytes):
            out.append(str(v))
            continue
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            out.append("".join(chr(b) if b < 0x80 else f"\\{b:02x}" for b in v))
    return out


def _get(raw: dict, name: str) -> list:
    if name in raw:
        return raw[name]
    lname = name.lower()
    for key, value in raw.items():
        if key.lower() == lname:
            return value
    return []


def _attribute(config: DirectoryConfig, field: str, attr: str, values: list, record: dict):
    """One mapped attribute's value(s), encoded as the schema says; problems go on the record."""
    encoded, encoding, bad = values_mod.encode(values, config.syntaxes.encoding(attr))
    if encoding != "text":
        record.setdefault("encodings", {})[field] = encoding
    if bad:
        record.setdefault("problems", []).append({
            "code": "binary_in_text", "attribute": attr,
            "message": f"{attr} is text in the schema but {len(bad)} value(s) are not UTF-8; "
                       f"kept as base64 in field {field!r} (fix the value, or list {attr} in "
                       "binary_attributes if it really holds bytes)"})
    return encoded[0] if len(encoded) == 1 else (encoded or None)


def to_record(config: DirectoryConfig, kind: str, dn: str, raw: dict) -> dict:
    """A plain `upsert` record for one user or group entry (raw ldap3 attributes).

    Optional keys: ``encodings`` {field: base64|uuid|sid} for fields that are not
    plain text, ``problems`` [{code, message, attribute}] for values that could
    not be carried as the mapping says (home shows them in ``directory status``).
    """
    mapping = config.user_mapping if kind == "user" else config.group_mapping
    record = {"op": "upsert", "kind": kind, "id": entry_id(config, raw), "dn": dn}
    attributes = {}
    for field, attr in mapping.items():
        attributes[field] = _attribute(config, field, attr, _get(raw, attr), record)
    record["attributes"] = attributes
    if kind == "group":
        record["members"] = _text(_get(raw, config.member_attribute))
    else:
        uac = _get(raw, "userAccountControl")
        if uac:
            record["disabled"] = bool(int(_text(uac)[0]) & 0x2)
        elif config.kind == "openldap":
            lock = _text(_get(raw, "pwdAccountLockedTime"))
            if lock:  # no lock: no "disabled" key, as before (home reads None as enabled)
                record["disabled"] = ADMIN_LOCK in lock
        if config.sync_password_hashes:
            record["password_hashes"] = _text(_get(raw, "userPassword"))
    return record


def classify(config: DirectoryConfig, raw: dict) -> str | None:
    """'user' or 'group' by objectClass (for entries seen in incremental sync)."""
    classes = {c.lower() for c in _text(_get(raw, "objectClass"))}
    if config.kind == "ad":
        if "group" in classes:
            return "group"
        if "user" in classes and "computer" not in classes:
            return "user"
        return None
    if classes & {"groupofnames", "groupofuniquenames", "posixgroup"}:
        return "group"
    if classes & {"inetorgperson", "person", "posixaccount", "organizationalperson"}:
        return "user"
    return None


def schema_attribute_names(config: DirectoryConfig, conn) -> set[str]:
    """All attribute type names (lower case) the server's subschema defines (empty: unreadable)."""
    if not config.syntaxes.loaded:
        config.syntaxes.load(conn)
    return set(config.syntaxes.names)


def check_mapping(config: DirectoryConfig, conn) -> None:
    """Fail clearly when the mapping names an attribute the directory does not have."""
    known = schema_attribute_names(config, conn)
    if not known:
        return  # schema not readable: the server will tell us per search
    for kind, mapping in (("user", config.user_mapping), ("group", config.group_mapping)):
        for field, attr in mapping.items():
            if attr.lower() not in known:
                raise DirectoryError(
                    "missing_attribute",
                    f"attribute_mapping.{kind}.{field} names {attr!r}, which directory "
                    f"{config.name!r} does not define; pick an attribute from its schema",
                    reason=attr)
