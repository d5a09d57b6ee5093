"""Fixtures: a real slapd (and a real Samba AD DC) on loopback for the directory engine.

Session-scoped where the server can be shared (tests use distinct names), a
fresh function-scoped slapd where a test stops servers or purges logs.
"""

from __future__ import annotations

import shutil
import ssl
import sys
import tempfile
from pathlib import Path

import ldap3
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ldapfix_ca import make_ca  # noqa: E402
from ldapfix_slapd import (ADMIN_DN, ADMIN_PW, SUFFIX, SVC_DN, SVC_PW, create_slapd,  # noqa: E402
                           group_ldif, ssha, user_ldif)


@pytest.fixture(scope="session")
def ldap_tmp():
    path = Path(tempfile.mkdtemp(prefix="tether-ldap-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def test_ca(ldap_tmp):
    return make_ca(ldap_tmp / "tls", dns_names=("localhost",))


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


@pytest.fixture(scope="session")
def slapd(ldap_tmp, test_ca):
    server = create_slapd(ldap_tmp / "slapd", test_ca, data_ldif=seed_ldif())
    yield server
    server.destroy()


@pytest.fixture
def slapd_factory(tmp_path, test_ca):
    """Make extra slapd instances (own dirs, own ports) that are destroyed after the test."""
    made = []

    def make(name: str, data: str | None = None, start: bool = True):
        server = create_slapd(tmp_path / name, test_ca, data_ldif=data, start=start)
        made.append(server)
        return server
    yield make
    for server in made:
        server.destroy()


def slapd_config(server, ca, **over) -> dict:
    """A directory configuration dict (as home would push it) for a slapd fixture."""
    raw = {"name": "ldap-test", "kind": "openldap", "servers": [f"localhost:{server.tls_port}"],
           "tls": "ldaps", "ca_file": str(ca.ca_file), "bind_dn": SVC_DN, "bind_password": SVC_PW,
           "base_dns": [SUFFIX], "user_container": f"ou=people,{SUFFIX}", "page_size": 7}
    raw.update(over)
    return raw


@pytest.fixture
def ldap_raw(slapd, test_ca):
    return slapd_config(slapd, test_ca)


def admin_connection(server, ca) -> ldap3.Connection:
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca.ca_file))
    return ldap3.Connection(ldap3.Server("localhost", port=server.tls_port, use_ssl=True, tls=tls),
                            ADMIN_DN, ADMIN_PW, auto_bind=True)


@pytest.fixture
def ldap_admin(slapd, test_ca):
    conn = admin_connection(slapd, test_ca)
    yield conn
    conn.unbind()


# --- Samba AD DC ---------------------------------------------------------------

from ldapfix_samba import ADMIN_DN as AD_ADMIN_DN, ADMIN_PW as AD_ADMIN_PW, BASE_DN as AD_BASE, create_samba  # noqa: E402


@pytest.fixture(scope="session")
def samba(ldap_tmp, test_ca):
    dc = create_samba(ldap_tmp / "samba", test_ca)
    yield dc
    dc.destroy()


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


@pytest.fixture
def ad_raw(samba, test_ca):
    return ad_config(test_ca)


@pytest.fixture
def ad_admin(samba, test_ca):
    conn = ad_admin_connection(test_ca)
    yield conn
    conn.unbind()


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
