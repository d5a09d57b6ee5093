"""Validation of one directory's configuration dict (as home pushes it).

Why: every later step (pool, TLS, sync, auth, provisioning) trusts these
values, so all checks that need no server happen here, once, with errors that
name the offending key and say what to put there instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography import x509
from ldap3.core.exceptions import LDAPInvalidFilterError
from ldap3.operation.search import parse_filter

from .errors import DirectoryConfigError, DirectoryError
from .values import Syntaxes

KINDS = ("openldap", "ad")
TLS_MODES = ("ldaps", "starttls", "plain")
DEFAULT_PORTS = {"ldaps": 636, "starttls": 389, "plain": 389}
#: Logins a directory checks at once (auth.AuthPool): enough to keep a directory server
#: busy on a small appliance; each holds two connections, so the bound caps those too.
DEFAULT_AUTH_CONNECTIONS = 4
MAX_AUTH_CONNECTIONS = 32
DEFAULT_MAPPING = {
    "openldap": {"user": {"username": "uid", "name": "cn", "email": "mail"},
                 "group": {"name": "cn"}},
    "ad": {"user": {"username": "sAMAccountName", "name": "displayName", "email": "mail",
                    "upn": "userPrincipalName"},
           "group": {"name": "sAMAccountName"}},
}
DEFAULT_FILTERS = {
    "openldap": ("(objectClass=inetOrgPerson)", "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))"),
    "ad": ("(&(objectCategory=person)(objectClass=user))", "(objectClass=group)"),
}


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DirectoryConfig:
    """A validated directory configuration; build it with `load_config(dict)`."""

    name: str
    kind: str
    servers: tuple[ServerAddress, ...]
    tls: str
    ca_file: str | None
    ca_pem: str | None
    bind_dn: str
    bind_password: str = field(repr=False)
    base_dns: tuple[str, ...]
    user_filter: str
    group_filter: str
    user_mapping: dict
    group_mapping: dict
    login_attribute: str
    member_attribute: str
    user_container: str | None
    group_container: str | None
    page_size: int
    sync_password_hashes: bool
    connect_timeout: float
    receive_timeout: int
    #: most logins checked at once (each holds two connections): auth.AuthPool
    auth_connections: int = DEFAULT_AUTH_CONNECTIONS
    #: which attributes are binary (schema + `binary_attributes`); filled on first connect
    syntaxes: Syntaxes = field(default_factory=Syntaxes, compare=False, repr=False)
    #: AD: read members in pages of this many values (`member;range=0-N`, ranges.py);
    #: None lets the server decide (Windows AD pages above MaxValRange by itself)
    member_range_size: int | None = None


def _require(raw: dict, key: str, kind=str):
    if key not in raw or raw[key] in (None, ""):
        raise DirectoryConfigError(f"'{key}' is required")
    if not isinstance(raw[key], kind):
        raise DirectoryConfigError(f"'{key}' must be a {getattr(kind, '__name__', kind)}")
    return raw[key]


def _servers(raw: dict, tls: str) -> tuple[ServerAddress, ...]:
    items = raw.get("servers")
    if not isinstance(items, list) or not items:
        raise DirectoryConfigError("'servers' must be a non-empty list of 'host' or 'host:port' "
                          "strings or {'host', 'port'} objects, primary first")
    out = []
    for item in items:
        if isinstance(item, dict):
            host, port = item.get("host"), item.get("port", DEFAULT_PORTS[tls])
        elif isinstance(item, str):
            host, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", DEFAULT_PORTS[tls])
        else:
            raise DirectoryConfigError(f"server {item!r}: give 'host', 'host:port' or {{'host', 'port'}}")
        try:
            port = int(port)
        except (TypeError, ValueError):
            raise DirectoryConfigError(f"server {item!r}: port must be a number") from None
        if not host or not 0 < port < 65536:
            raise DirectoryConfigError(f"server {item!r}: needs a host name and a port in 1..65535")
        out.append(ServerAddress(host, port))
    return tuple(out)


def check_filter(text: str, key: str) -> str:
    """Parse an LDAP filter now so a typo fails at configuration time, not mid-sync."""
    try:
        parse_filter(text, None, True, True, None, False)
    except (LDAPInvalidFilterError, Exception) as exc:  # ldap3 raises several kinds
        raise DirectoryError("bad_filter", f"'{key}' is not a valid LDAP filter: {text!r} ({exc}); "
                             "write it like (&(objectClass=person)(uid=*))") from None
    return text


def _mapping(raw: dict, kind: str, which: str) -> dict:
    mapping = dict(DEFAULT_MAPPING[kind][which])
    given = (raw.get("attribute_mapping") or {}).get(which)
    if given is not None:
        if not isinstance(given, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                  for k, v in given.items()):
            raise DirectoryConfigError(f"'attribute_mapping.{which}' must map field names to attribute names")
        mapping = dict(given)
    return mapping


KNOWN_KEYS = {
    "name", "id", "kind", "servers", "tls", "allow_plain", "ca_file", "ca_pem", "bind_dn", "bind_password",
    "base_dns", "user_filter", "group_filter", "attribute_mapping", "login_attribute", "member_attribute",
    "user_container", "group_container", "page_size", "sync_password_hashes", "connect_timeout",
    "receive_timeout", "schedule", "cluster", "binary_attributes", "auth_connections", "member_range_size",
}


def _trust(raw: dict, tls: str) -> tuple[str | None, str | None]:
    """The CA to validate servers against: a PEM file path or PEM text (as home pushes it)."""
    ca_file, ca_pem = raw.get("ca_file"), raw.get("ca_pem")
    if tls == "plain":
        return ca_file, ca_pem
    if not ca_file and not ca_pem:
        raise DirectoryConfigError("'ca_pem' (PEM text) or 'ca_file' (path) is required with TLS: the CA that "
                          "signed the directory servers' certificates")
    if ca_file and not os.path.isfile(ca_file):
        raise DirectoryConfigError(f"'ca_file' {ca_file!r} does not exist")
    if ca_pem:
        try:
            if not x509.load_pem_x509_certificates(ca_pem.encode()):
                raise ValueError("no certificate")
        except (ValueError, AttributeError):
            raise DirectoryConfigError("'ca_pem' holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    return ca_file, ca_pem


def load_config(raw: dict) -> DirectoryConfig:
    """Check a configuration dict and return the normalized, immutable config."""
    if not isinstance(raw, dict):
        raise DirectoryConfigError("the directory configuration must be a JSON object")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise DirectoryConfigError(f"unknown key(s) {', '.join(map(repr, unknown))}; known keys: "
                          f"{', '.join(sorted(KNOWN_KEYS))}")
    kind = raw.get("kind", "openldap")
    if kind not in KINDS:
        raise DirectoryConfigError(f"'kind' must be one of {', '.join(KINDS)}, not {kind!r}")
    tls = raw.get("tls", "ldaps")
    if tls not in TLS_MODES:
        raise DirectoryConfigError(f"'tls' must be one of {', '.join(TLS_MODES)}, not {tls!r}")
    if tls == "plain" and raw.get("allow_plain") is not True:
        raise DirectoryConfigError("'tls': 'plain' sends passwords in clear text; use 'ldaps' or 'starttls', "
                          "or set 'allow_plain': true if this network is trusted")
    ca_file, ca_pem = _trust(raw, tls)
    base_dns = raw.get("base_dns")
    if isinstance(base_dns, str):
        base_dns = [base_dns]
    if not isinstance(base_dns, list) or not base_dns or not all(isinstance(b, str) and b for b in base_dns):
        raise DirectoryConfigError("'base_dns' must be a non-empty list of DNs to synchronize")
    user_filter, group_filter = DEFAULT_FILTERS[kind]
    user_mapping = _mapping(raw, kind, "user")
    page_size = raw.get("page_size", 500)
    if not isinstance(page_size, int) or not 1 <= page_size <= 10000:
        raise DirectoryConfigError("'page_size' must be an integer between 1 and 10000")
    auth_connections = raw.get("auth_connections", DEFAULT_AUTH_CONNECTIONS)
    if not isinstance(auth_connections, int) or isinstance(auth_connections, bool) \
            or not 1 <= auth_connections <= MAX_AUTH_CONNECTIONS:
        raise DirectoryConfigError(f"'auth_connections' must be an integer between 1 and "
                          f"{MAX_AUTH_CONNECTIONS} (logins checked at once; default "
                          f"{DEFAULT_AUTH_CONNECTIONS})")
    return DirectoryConfig(
        name=str(raw.get("name", "directory")), kind=kind, servers=_servers(raw, tls), tls=tls,
        ca_file=ca_file, ca_pem=ca_pem, bind_dn=_require(raw, "bind_dn"), bind_password=_require(raw, "bind_password"),
        base_dns=tuple(base_dns),
        user_filter=check_filter(raw.get("user_filter", user_filter), "user_filter"),
        group_filter=check_filter(raw.get("group_filter", group_filter), "group_filter"),
        user_mapping=user_mapping, group_mapping=_mapping(raw, kind, "group"),
        login_attribute=raw.get("login_attribute", user_mapping.get("username", "uid")),
        member_attribute=raw.get("member_attribute", "member"),
        user_container=raw.get("user_container"),
        group_container=raw.get("group_container"),
        page_size=page_size, sync_password_hashes=bool(raw.get("sync_password_hashes", False)),
        connect_timeout=float(raw.get("connect_timeout", 5)),
        receive_timeout=max(1, int(raw.get("receive_timeout", 5))),
        auth_connections=auth_connections,
        syntaxes=Syntaxes(_binary_attributes(raw)),
        member_range_size=_range_size(raw, kind),
    )


def _range_size(raw: dict, kind: str) -> int | None:
    """`member_range_size`: AD only (OpenLDAP has no value ranges), 1..100,000 or absent."""
    size = raw.get("member_range_size")
    if size is None:
        return None
    if kind != "ad":
        raise DirectoryConfigError("'member_range_size' applies to kind 'ad' only (OpenLDAP sends every "
                          "value at once); remove it")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 100_000:
        raise DirectoryConfigError("'member_range_size' must be an integer between 1 and 100000 (AD's own "
                          "page is 1500), or absent to let the server decide")
    return size


def _binary_attributes(raw: dict) -> tuple[str, ...]:
    """Attributes to carry as base64 whatever the schema says (a server that hides its schema)."""
    given = raw.get("binary_attributes", [])
    if not isinstance(given, list) or not all(isinstance(a, str) and a for a in given):
        raise DirectoryConfigError("'binary_attributes' must be a list of attribute names whose values "
                          "are bytes (sent home as base64)")
    return tuple(given)
