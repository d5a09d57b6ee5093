"""Provisioning orders from home: write users and group memberships.

Why every order returns a result instead of raising: home records the outcome
of each order id (done / failed with the server's own reason). A write whose
connection dropped after sending is reported with `outcome_unknown`, so home
never blindly retries a write on another connector.

Why an order may ask for ``read_back``: a SCIM client (home's API) must answer
with the entry's id and state right after the write, before the change feed
brings it home; the agent reads the entry back on the same connection and adds
it to the result as ``entry``, a record of the very shape the sync sends
(:func:`mapping.to_record`), so home can store it as it stores synced records.
"""


from __future__ import annotations

import ldap3
from ldap3.core import exceptions as lx
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn

from tether import dn as dnmeaning

from . import ranges
from .auth import ADMIN_LOCK, find_user
from .config import DirectoryConfig
from .connection import DOWN_ERRORS, Pool
from .errors import DirectoryError
from .mapping import search_attributes, to_record

UAC_DISABLED = 0x2
UAC_NORMAL = 0x200
#: AD groupType of a global security group (the default of "New Group" in AD tools)
AD_GLOBAL_SECURITY_GROUP = -2147483646


class OrderError(Exception):
    """An order that cannot be carried out, with the reason to send home."""


def _done(order: dict, **extra) -> dict:
    return {"id": order.get("id"), "op": order.get("op"), "status": "done", **extra}


def _failed(order: dict, reason: str, code: str = "operation_failed", **extra) -> dict:
    return {"id": order.get("id"), "op": order.get("op"), "status": "failed", "code": code,
            "reason": reason, **extra}


def _ldap_attrs(config: DirectoryConfig, fields: dict, skip_unmapped: bool = False,
               ignored: list | None = None) -> dict:
    """Map user fields to attributes. ``skip_unmapped`` (SCIM clients send every field
    they know, the directory maps only some) drops unknown fields into ``ignored``."""
    out = {}
    for field, value in (fields or {}).items():
        attr = config.user_mapping.get(field, None)
        if attr is None:
            if skip_unmapped:
                if ignored is not None:
                    ignored.append(field)
                continue
            raise OrderError(f"unknown user field {field!r}; known: {', '.join(sorted(config.user_mapping))}")
        if value is None or value == [] or value == "":
            continue  # nothing to write at creation
        out[attr] = value
    return out


def _attrs_of(config: DirectoryConfig, order: dict) -> dict:
    ignored = order.setdefault("_ignored", [])
    return _ldap_attrs(config, order.get("attributes"), bool(order.get("skip_unmapped")), ignored)


def _user_dn(config: DirectoryConfig, conn, order: dict) -> str:
    if order.get("dn"):
        return order["dn"]
    if order.get("username"):
        entry = find_user(config, conn, order["username"])
        if entry is None:
            raise OrderError(f"no user with {config.login_attribute}={order['username']!r}")
        return entry["dn"]
    raise OrderError("the order needs 'dn' or 'username'")


def _group_dn(config: DirectoryConfig, conn, order: dict) -> str:
    if order.get("group_dn"):
        return order["group_dn"]
    name = order.get("group")
    if not name:
        raise OrderError("the order needs 'group_dn' or 'group'")
    attr = config.group_mapping.get("name", "cn")
    for base in config.base_dns:
        conn.search(base, f"(&{config.group_filter}({attr}={escape_filter_chars(name)}))", attributes=["1.1"])
        hits = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
        if hits:
            return hits[0]["dn"]
    raise OrderError(f"no group with {attr}={name!r}")


def _member_dn(config: DirectoryConfig, conn, order: dict) -> str:
    if order.get("member_dn"):
        return order["member_dn"]
    return _user_dn(config, conn, {"username": order.get("member")})


def _require_ok(conn, what: str) -> dict:
    res = conn.result or {}
    if res.get("result", 0) != 0:
        raise _ServerRefused(res)
    return res


class _ServerRefused(Exception):
    def __init__(self, result: dict):
        self.result = result
        super().__init__(result.get("description"))


# --- the operations -----------------------------------------------------------

def create_user(config, conn, order):
    username = order.get("username") or ""
    if not username:
        raise OrderError("create_user needs 'username'")
    attrs = _attrs_of(config, order)
    container = order.get("container") or config.user_container
    if not container:
        raise OrderError("create_user needs 'container' (or 'user_container' in the directory config)")
    if config.kind == "ad":
        cn = attrs.get("cn") or attrs.get("displayName") or username
        dn = f"CN={escape_rdn(cn)},{container}"
        attrs.setdefault("sAMAccountName", username)
        attrs["userAccountControl"] = str(UAC_NORMAL | UAC_DISABLED)
        conn.add(dn, ["top", "person", "organizationalPerson", "user"], attrs)
        _require_ok(conn, "create")
        if order.get("password"):
            _set_password(config, conn, dn, order["password"])
        if order.get("enabled", True) and order.get("password"):
            _set_uac(conn, dn, enable=True)
        return dn
    login = config.login_attribute
    dn = f"{login}={escape_rdn(username)},{container}"
    attrs.setdefault(login, username)
    attrs.setdefault("cn", username)
    attrs.setdefault("sn", attrs.get("cn") or username)
    conn.add(dn, order.get("object_classes") or ["inetOrgPerson"], attrs)
    _require_ok(conn, "create")
    if order.get("password"):
        _set_password(config, conn, dn, order["password"])
    return dn


def update_user(config, conn, order):
    dn = _user_dn(config, conn, order)
    ignored = order.setdefault("_ignored", [])
    changes = {attr: [(ldap3.MODIFY_REPLACE, [] if value is None or value == "" else
                       (value if isinstance(value, list) else [value]))]
               for attr, value in _update_attrs(config, order, ignored).items()}
    if not changes:
        raise OrderError("update_user needs 'attributes'")
    conn.modify(dn, changes)
    _require_ok(conn, "update")
    return dn


def _update_attrs(config, order, ignored: list) -> dict:
    """Like :func:`_ldap_attrs` but keeps empty values: an update clears them."""
    out = {}
    for field, value in (order.get("attributes") or {}).items():
        attr = config.user_mapping.get(field)
        if attr is None:
            if order.get("skip_unmapped"):
                ignored.append(field)
                continue
            raise OrderError(f"unknown user field {field!r}; known: {', '.join(sorted(config.user_mapping))}")
        out[attr] = value
    return out


def rename_user(config, conn, order):
    """Rename (new RDN value) and/or move (new container) a user."""
    dn = _user_dn(config, conn, order)
    rdn_attr, rdn_value = parse_dn(dn)[0][0], parse_dn(dn)[0][1]
    new_value = order.get("new_name") or rdn_value
    new_rdn = f"{rdn_attr}={escape_rdn(new_value) if order.get('new_name') else rdn_value}"
    container = order.get("new_container")
    conn.modify_dn(dn, new_rdn, new_superior=container)
    _require_ok(conn, "rename")
    parent = container or dnmeaning.split_rdn(dn)[1]  # never split inside an escaped comma
    return f"{new_rdn},{parent}"


def _set_uac(conn, dn: str, enable: bool) -> None:
    conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["userAccountControl"])
    _require_ok(conn, "read")
    uac = int(conn.response[0]["raw_attributes"]["userAccountControl"][0])
    uac = uac & ~UAC_DISABLED if enable else uac | UAC_DISABLED
    conn.modify(dn, {"userAccountControl": [(ldap3.MODIFY_REPLACE, [str(uac)])]})
    _require_ok(conn, "enable/disable")


def set_enabled(config, conn, order, enable: bool):
    dn = _user_dn(config, conn, order)
    if config.kind == "ad":
        _set_uac(conn, dn, enable)
        return dn
    # OpenLDAP ppolicy: an administrative lock that never times out means "disabled"
    conn.modify(dn, {"pwdAccountLockedTime": [(ldap3.MODIFY_DELETE, [])] if enable
                     else [(ldap3.MODIFY_REPLACE, [ADMIN_LOCK])]})
    if enable and (conn.result or {}).get("result") == 16:  # was not disabled: nothing to do
        return dn
    _require_ok(conn, "enable/disable")
    return dn


def delete_user(config, conn, order):
    return _delete(conn, _user_dn(config, conn, order), "delete")


def _set_password(config, conn, dn: str, password: str) -> None:
    if config.kind == "ad":
        if config.tls == "plain":
            raise OrderError("AD accepts unicodePwd only over LDAPS or StartTLS; configure 'tls'")
        value = ('"' + password + '"').encode("utf-16-le")
        conn.modify(dn, {"unicodePwd": [(ldap3.MODIFY_REPLACE, [value])]})
        _require_ok(conn, "set password")
        return
    # RFC 3062 password modify: the server hashes with its own scheme and ppolicy applies
    conn.extend.standard.modify_password(dn, new_password=password)
    _require_ok(conn, "set password")


def set_password(config, conn, order):
    if not order.get("password"):
        raise OrderError("set_password needs 'password'")
    dn = _user_dn(config, conn, order)
    _set_password(config, conn, dn, order["password"])
    return dn


def change_member(config, conn, order, add: bool):
    group = _group_dn(config, conn, order)
    member = _member_dn(config, conn, order)
    conn.modify(group, {config.member_attribute: [(ldap3.MODIFY_ADD if add else ldap3.MODIFY_DELETE, [member])]})
    code = (conn.result or {}).get("result")
    if add and code in (20, 68):  # attributeOrValueExists / entryAlreadyExists (AD)
        return group, "already a member"
    if not add and code == 16:  # noSuchAttribute: the value was not there
        return group, "was not a member"
    _require_ok(conn, "membership")
    return group, None


def create_group(config, conn, order):
    """A group named ``group`` in ``container`` (or ``group_container``, else
    ``user_container``) with ``members`` (DNs). OpenLDAP's groupOfNames must hold
    a member: an empty group gets the empty DN, which every reader ignores."""
    name = order.get("group") or ""
    if not name:
        raise OrderError("create_group needs 'group' (the group's name)")
    members = order.get("members") or []
    if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
        raise OrderError("create_group 'members' must be a list of member DNs")
    container = order.get("container") or config.group_container or config.user_container
    if not container:
        raise OrderError("create_group needs 'container' (or 'group_container' in the directory config)")
    name_attr = config.group_mapping.get("name", "cn")
    if config.kind == "ad":
        dn = f"CN={escape_rdn(name)},{container}"
        attrs = {"sAMAccountName": name, "groupType": str(AD_GLOBAL_SECURITY_GROUP)}
        if name_attr not in ("sAMAccountName", "cn"):
            attrs[name_attr] = name
        if members:
            attrs[config.member_attribute] = members
        conn.add(dn, ["top", "group"], attrs)
    else:
        dn = f"cn={escape_rdn(name)},{container}"
        attrs = {"cn": name, config.member_attribute: members or [""]}
        if name_attr != "cn":
            attrs[name_attr] = name
        object_class = "groupOfUniqueNames" if config.member_attribute.lower() == "uniquemember" \
            else "groupOfNames"
        conn.add(dn, order.get("object_classes") or [object_class], attrs)
    _require_ok(conn, "create group")
    return dn


def delete_group(config, conn, order):
    return _delete(conn, _group_dn(config, conn, order), "delete group")


def _delete(conn, dn: str, what: str) -> str:
    """Delete the entry at ``dn`` (found by the order's name or id); ``what`` names the
    operation in the error when the server refuses."""
    conn.delete(dn)
    _require_ok(conn, what)
    return dn


def read_back(config: DirectoryConfig, conn, dn: str, kind: str) -> dict | None:
    """The entry at ``dn`` as a sync record (None when it cannot be read)."""
    attrs = search_attributes(config, kind)
    conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=attrs)
    hits = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
    if (conn.result or {}).get("result", 0) != 0 or not hits:
        return None
    if ranges.is_ranged(hits[0]):
        ranges.complete(conn, hits[0], config.member_range_size)
    return to_record(config, kind, hits[0]["dn"], hits[0]["raw_attributes"])


#: op -> kind of the entry whose DN the op returns (read back on request)
_READ_BACK_KIND = {"create_user": "user", "update_user": "user", "rename_user": "user",
                   "move_user": "user", "disable_user": "user", "enable_user": "user",
                   "set_password": "user", "add_member": "group", "remove_member": "group",
                   "create_group": "group"}


def _run(config, conn, order) -> dict:
    order = {**order, "_ignored": []}  # the fields skip_unmapped dropped (the caller's dict stays)
    result = _carry_out(config, conn, order)
    ignored = order.pop("_ignored")
    if ignored:
        result["ignored"] = sorted(set(ignored))
    kind = _READ_BACK_KIND.get(order.get("op"))
    if order.get("read_back") and kind and result.get("dn"):
        try:
            entry = read_back(config, conn, result["dn"], kind)
        except (lx.LDAPException, DirectoryError):
            entry = None
        if entry is None:
            result["read_back_failed"] = True
        else:
            result["entry"] = entry
    return result


def _carry_out(config, conn, order) -> dict:
    op = order.get("op")
    if op == "create_user":
        return _done(order, dn=create_user(config, conn, order))
    if op == "update_user":
        return _done(order, dn=update_user(config, conn, order))
    if op in ("rename_user", "move_user"):
        return _done(order, dn=rename_user(config, conn, order))
    if op in ("disable_user", "enable_user"):
        return _done(order, dn=set_enabled(config, conn, order, op == "enable_user"))
    if op == "delete_user":
        return _done(order, dn=delete_user(config, conn, order))
    if op == "set_password":
        return _done(order, dn=set_password(config, conn, order))
    if op in ("add_member", "remove_member"):
        group, note = change_member(config, conn, order, op == "add_member")
        return _done(order, dn=group, **({"note": note} if note else {}))
    if op == "create_group":
        return _done(order, dn=create_group(config, conn, order))
    if op == "delete_group":
        return _done(order, dn=delete_group(config, conn, order))
    raise OrderError(f"unknown provisioning op {op!r}; one of create_user, update_user, rename_user, "
                     "move_user, disable_user, enable_user, delete_user, set_password, add_member, "
                     "remove_member, create_group, delete_group")


def provision(config: DirectoryConfig, order: dict, pool: Pool | None = None) -> dict:
    """Carry out one order; always returns a result dict (never raises for server refusals)."""
    if not isinstance(order, dict):
        return _failed({}, "an order must be a JSON object")
    try:
        conn = (pool or Pool(config)).connect()
    except DirectoryError as exc:
        return _failed(order, exc.message, exc.code)  # nothing was sent: safe to retry elsewhere
    try:
        return _run(config, conn, order)
    except OrderError as exc:
        return _failed(order, str(exc), "bad_order")
    except _ServerRefused as exc:
        res = exc.result
        reason = res.get("message") or res.get("description")
        return _failed(order, f"{res.get('description')}: {reason}" if reason != res.get("description")
                       else reason, server_code=res.get("result"))
    except DOWN_ERRORS as exc:
        return _failed(order, f"connection lost during the write: {exc}", "server_down", outcome_unknown=True)
    except lx.LDAPException as exc:
        return _failed(order, str(exc))
    finally:
        try:
            conn.unbind()
        except Exception:
            pass
