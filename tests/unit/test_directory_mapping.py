"""Record mapping, chunking and failure classification without a server."""

from __future__ import annotations

import uuid

import pytest

from tether.agent.directory.auth import _classify_failure, ppolicy_error
from tether.agent.directory.config import load_config
from tether.agent.directory.incremental import chunked
from tether.agent.directory.incremental_ad import _tombstone_rdn
from tether.agent.directory.mapping import classify, search_attributes, to_record


@pytest.fixture
def ldap_cfg(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    base = {"servers": ["h"], "ca_file": str(ca), "bind_dn": "cn=a", "bind_password": "p", "base_dns": ["dc=x"]}
    return lambda **kw: load_config({**base, **kw})


def test_openldap_user_record(ldap_cfg):
    cfg = ldap_cfg(sync_password_hashes=True)
    raw = {"entryUUID": [b"0e9903dc-7d5a-1041-9568-1db57c4ca981"], "uid": [b"alice"], "cn": [b"Alice"],
           "mail": [b"a@x", b"b@x"], "userPassword": [b"{SSHA}abc"], "objectClass": [b"inetOrgPerson"]}
    rec = to_record(cfg, "user", "uid=alice,dc=x", raw)
    assert rec == {"op": "upsert", "kind": "user", "id": "0e9903dc-7d5a-1041-9568-1db57c4ca981",
                   "dn": "uid=alice,dc=x", "attributes": {"username": "alice", "name": "Alice", "email": ["a@x", "b@x"]},
                   "password_hashes": ["{SSHA}abc"]}
    assert "userPassword" in search_attributes(cfg, "user")
    assert "userPassword" not in search_attributes(ldap_cfg(), "user")
    assert classify(cfg, raw) == "user"


def test_ad_record_guid_and_disabled_flag(ldap_cfg):
    cfg = ldap_cfg(kind="ad")
    guid = uuid.uuid4()
    raw = {"objectGUID": [guid.bytes_le], "sAMAccountName": [b"bob"], "userAccountControl": [b"514"],
           "objectClass": [b"top", b"user"]}
    rec = to_record(cfg, "user", "CN=bob,DC=x", raw)
    assert rec["id"] == str(guid) and rec["disabled"] is True and rec["attributes"]["email"] is None
    group = to_record(cfg, "group", "CN=g,DC=x", {"objectGUID": [guid.bytes_le], "member": [b"CN=bob,DC=x"]})
    assert group["members"] == ["CN=bob,DC=x"]


def test_chunks_are_numbered_and_bounded():
    chunks = list(chunked(range(7), 3))
    assert [c["seq"] for c in chunks] == [1, 2, 3] and [len(c["changes"]) for c in chunks] == [3, 3, 1]
    assert list(chunked([], 3)) == []


def test_ad_bind_error_codes(ldap_cfg):
    cfg = ldap_cfg(kind="ad")
    msg = "80090308: LdapErr: DSID-0C0903A9, comment: AcceptSecurityContext error, data {}, v1db1"
    expect = {"52e": "wrong_password", "533": "disabled", "775": "locked", "532": "expired",
              "701": "expired", "773": "expired"}
    for code, outcome in expect.items():
        assert _classify_failure(cfg, {"message": msg.format(code)}, {}) == outcome


def test_ppolicy_response_decoding():
    assert ppolicy_error(bytes.fromhex("3003810100")) == 0  # passwordExpired
    assert ppolicy_error(bytes.fromhex("3003810101")) == 1  # accountLocked
    assert ppolicy_error(bytes.fromhex("3005a003800105")) is None  # warning only
    assert ppolicy_error(None) is None


def test_tombstone_rdn():
    assert _tombstone_rdn("CN=frank\\0ADEL:dffecc0d-5b6d,CN=Deleted Objects,DC=x") == "frank"
    assert _tombstone_rdn("CN=Smith\\, John\\0ADEL:dffecc0d-5b6d,CN=Deleted Objects,DC=x") == "Smith, John"
