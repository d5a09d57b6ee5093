"""Directory configuration validation and the sync cursor (no server needed)."""

from __future__ import annotations

import pytest

from tether.agent.directory import cursor as cursors
from tether.agent.directory.config import load_config
from tether.agent.directory.errors import DirectoryConfigError, CursorExpired, DirectoryError


@pytest.fixture
def raw(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    return {"kind": "openldap", "servers": ["ldap1.example.com", "ldap2.example.com:1636"],
            "ca_file": str(ca), "bind_dn": "cn=svc,dc=example,dc=com", "bind_password": "s",
            "base_dns": ["dc=example,dc=com"]}


def test_defaults_and_normalized_servers(raw):
    c = load_config(raw)
    assert [(s.host, s.port) for s in c.servers] == [("ldap1.example.com", 636), ("ldap2.example.com", 1636)]
    assert c.tls == "ldaps" and c.page_size == 500 and c.login_attribute == "uid"
    assert c.auth_connections == 4 and load_config({**raw, "auth_connections": 32}).auth_connections == 32
    assert c.user_mapping["email"] == "mail" and not c.sync_password_hashes
    assert "bind_password" not in repr(c)  # the secret never lands in logs


@pytest.mark.parametrize("change, words", [
    ({"kind": "novell"}, "'kind'"),
    ({"tls": "ssl"}, "'tls'"),
    ({"tls": "plain"}, "allow_plain"),
    ({"ca_file": None}, "'ca_pem' \\(PEM text\\) or 'ca_file'"),
    ({"ca_file": None, "ca_pem": "garbage"}, "no PEM certificate"),
    ({"user_filer": "(uid=*)"}, "unknown key"),
    ({"ca_file": "/nonexistent/ca.pem"}, "does not exist"),
    ({"servers": []}, "'servers'"),
    ({"servers": ["host:99999"]}, "1..65535"),
    ({"base_dns": []}, "'base_dns'"),
    ({"bind_password": ""}, "'bind_password' is required"),
    ({"page_size": 0}, "'page_size'"),
    ({"auth_connections": 0}, "'auth_connections' must be an integer between 1 and 32"),
    ({"auth_connections": 33}, "'auth_connections'"),
    ({"auth_connections": "4"}, "'auth_connections'"),
    ({"auth_connections": True}, "'auth_connections'"),
    ({"attribute_mapping": {"user": {"email": 3}}}, "attribute_mapping.user"),
])
def test_bad_values_name_the_key(raw, change, words):
    raw.update(change)
    with pytest.raises(DirectoryConfigError, match=words if "\\" in words else words.replace("(", r"\(")):
        load_config(raw)


def test_bad_filter_has_its_own_code(raw):
    raw["group_filter"] = "objectClass=group"
    with pytest.raises(DirectoryError) as info:
        load_config(raw)
    assert info.value.code == "bad_filter" and info.value.to_dict()["hint"]


def test_cursor_round_trip_and_rejection():
    c = cursors.encode("openldap-accesslog", csn="x")
    assert cursors.decode(c, "openldap-accesslog")["csn"] == "x"
    with pytest.raises(CursorExpired):
        cursors.decode(c, "ad-usn")
    with pytest.raises(CursorExpired):
        cursors.decode("tc1:!!!", "ad-usn")
