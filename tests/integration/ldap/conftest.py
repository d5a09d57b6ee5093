"""Fixtures: a real slapd (and a real Samba AD DC) on loopback for the directory engine.

Session-scoped where the server can be shared (tests use distinct names), a
fresh function-scoped slapd where a test stops servers or purges logs.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ldapfix_ca import make_ca  # noqa: E402
from ldapfix_helpers import (ad_admin_connection, ad_config, admin_connection, seed_ldif,  # noqa: E402
                             slapd_config)
from ldapfix_samba import create_samba  # noqa: E402
from ldapfix_slapd import create_slapd  # noqa: E402


@pytest.fixture(scope="session")
def ldap_tmp():
    path = Path(tempfile.mkdtemp(prefix="tether-ldap-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def test_ca(ldap_tmp):
    return make_ca(ldap_tmp / "tls", dns_names=("localhost",))


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


@pytest.fixture
def seeded_ldap(slapd_factory, test_ca, request):
    """A fresh slapd of this test's own with the seed data (20 users, nested groups), and
    an admin connection: for tests that change the directory under a running home."""
    server = slapd_factory(request.module.__name__.rsplit(".", 1)[-1], seed_ldif())
    conn = admin_connection(server, test_ca)
    yield server, conn
    conn.unbind()


@pytest.fixture
def ldap_raw(slapd, test_ca):
    return slapd_config(slapd, test_ca)


@pytest.fixture
def ldap_admin(slapd, test_ca):
    conn = admin_connection(slapd, test_ca)
    yield conn
    conn.unbind()


# --- Samba AD DC ---------------------------------------------------------------



@pytest.fixture(scope="session")
def samba(ldap_tmp, test_ca):
    dc = create_samba(ldap_tmp / "samba", test_ca)
    yield dc
    dc.destroy()


@pytest.fixture
def ad_raw(samba, test_ca):
    return ad_config(test_ca)


@pytest.fixture
def ad_admin(samba, test_ca):
    conn = ad_admin_connection(test_ca)
    yield conn
    conn.unbind()

