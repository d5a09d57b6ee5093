"""Helpers shared by the directory tests and bench/directory.py (not fixtures).

Why not in conftest.py: test modules import these by name, and a module named
`conftest` is ambiguous once other test directories have their own.
"""

from __future__ import annotations

import ssl

import ldap3

from ldapfix_samba import ADMIN_DN as AD_ADMIN_DN, ADMIN_PW as AD_ADMIN_PW, BASE_DN as AD_BASE  # noqa: F401
from ldapfix_slapd import ADMIN_DN, ADMIN_PW, SUFFIX, SVC_DN, SVC_PW, group_ldif, ssha, user_ldif


def seed_ldif(n_users: int = 20) -> str:
    """Users u000..u0NN, with groups: staff (all), admins (u000,u001), nested (admins group)."""
    people = [f"uid=u{i:03d},ou=people,{SUFFIX}" for i in range(n_users)]
    parts = [user_ldif(f"u{i:03d}", ssha(f"pw{i:03d}")) for i in range(n_users)]
    parts.append(group_ldif("staff", people))
    parts.append(group_ldif("admins", people[:2]))
    parts.append(group_ldif("nested", [f"cn=admins,ou=groups,{SUFFIX}"]))
    parts.append(group_ldif("outer", [f"cn=nested,ou=groups,{SUFFIX}"]))
    parts.append(SHORT_POLICY)
    parts.append(user_ldif("expired1", ssha("pw-expired"), pwdPolicySubentry=f"cn=short,ou=policies,{SUFFIX}",
                           pwdChangedTime="20200101000000Z"))
    return "\n".join(parts)


SHORT_POLICY = f"""dn: cn=short,ou=policies,{SUFFIX}
objectClass: pwdPolicy
objectClass: device
cn: short
pwdAttribute: userPassword
pwdMaxAge: 60
pwdGraceAuthNLimit: 0
"""


def slapd_config(server, ca, **over) -> dict:
    """A directory configuration dict (as home would push it) for a slapd fixture."""
    raw = {"name": "ldap-test", "kind": "openldap", "servers": [f"localhost:{server.tls_port}"],
           "tls": "ldaps", "ca_file": str(ca.ca_file), "bind_dn": SVC_DN, "bind_password": SVC_PW,
           "base_dns": [SUFFIX], "user_container": f"ou=people,{SUFFIX}", "page_size": 7}
    raw.update(over)
    return raw


def admin_connection(server, ca) -> ldap3.Connection:
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca.ca_file))
    return ldap3.Connection(ldap3.Server("localhost", port=server.tls_port, use_ssl=True, tls=tls),
                            ADMIN_DN, ADMIN_PW, auto_bind=True)


def ad_admin_connection(ca) -> ldap3.Connection:
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca.ca_file))
    return ldap3.Connection(ldap3.Server("localhost", port=636, use_ssl=True, tls=tls, get_info=ldap3.NONE),
                            AD_ADMIN_DN, AD_ADMIN_PW, auto_bind=True, check_names=False)


def ad_config(ca, **over) -> dict:
    raw = {"name": "ad-test", "kind": "ad", "servers": ["localhost:636"], "tls": "ldaps",
           "ca_file": str(ca.ca_file), "bind_dn": AD_ADMIN_DN, "bind_password": AD_ADMIN_PW,
           "base_dns": [AD_BASE], "user_container": f"CN=Users,{AD_BASE}", "page_size": 50}
    raw.update(over)
    return raw


def ad_user(conn, name: str, password: str = "Passw0rd-1", container: str | None = None) -> str:
    """Create an enabled AD user with a password (helper for tests); returns its DN."""
    dn = f"CN={name},{container or 'CN=Users,' + AD_BASE}"
    assert conn.add(dn, ["top", "person", "organizationalPerson", "user"],
                    {"sAMAccountName": name, "userAccountControl": "514", "mail": f"{name}@tether.test",
                     "displayName": name.title()}), conn.result
    assert conn.modify(dn, {"unicodePwd": [(ldap3.MODIFY_REPLACE, [f'"{password}"'.encode("utf-16-le")])]}), conn.result
    assert conn.modify(dn, {"userAccountControl": [(ldap3.MODIFY_REPLACE, ["512"])]}), conn.result
    return dn


def ad_group(conn, name: str, members: list[str]) -> str:
    dn = f"CN={name},CN=Users,{AD_BASE}"
    attrs = {"sAMAccountName": name}
    if members:
        attrs["member"] = members
    assert conn.add(dn, ["top", "group"], attrs), conn.result
    return dn
