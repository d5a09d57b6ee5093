"""Ranged values (AD `member;range=lo-hi`): every page read, or a clear error, never a
silently truncated group (agent/directory/ranges.py). The real-server test is in
tests/integration/ldap/test_ad.py (Samba answering explicit range requests)."""

from __future__ import annotations

import pytest

from tether.agent.directory import ranges
from tether.agent.directory.config import load_config
from tether.agent.directory.errors import DirectoryConfigError, DirectoryError
from tether.agent.directory.mapping import search_attributes


class FakeConn:
    """Answers base reads of `member;range=a-b` from a list, as AD does (capped pages)."""

    def __init__(self, values, cap, answer=None):
        self.values, self.cap, self.answer, self.asked = values, cap, answer, []
        self.result, self.response = {"result": 0}, []
        self.server = type("S", (), {"host": "dc", "port": 636})()

    def search(self, dn, flt, search_scope=None, attributes=None):
        (want,) = attributes
        self.asked.append(want)
        attr, lo, hi = ranges.parse(want)
        if self.answer is not None:
            self.response = [{"type": "searchResEntry", "dn": dn, "raw_attributes": self.answer}]
            return True
        end = min(len(self.values), lo + self.cap, hi + 1 if hi is not None else len(self.values))
        name = f"{attr};range={lo}-{'*' if end >= len(self.values) else end - 1}"
        self.response = [{"type": "searchResEntry", "dn": dn,
                          "raw_attributes": {name: self.values[lo:end]}}]
        return True


def entry(first_name, values):
    return {"dn": "CN=big,DC=x", "raw_attributes": {first_name: values, "cn": [b"big"]}}


def test_parse():
    assert ranges.parse("member;range=0-1499") == ("member", 0, 1499)
    assert ranges.parse("Member;range=1500-*") == ("Member", 1500, None)
    assert ranges.parse("member;x-opt;range=3-4") == ("member;x-opt", 3, 4)
    assert ranges.parse("member") is None and ranges.parse("member;range=a-b") is None


@pytest.mark.parametrize("page", [None, 7])
def test_every_page_is_read_and_merged(page):
    values = [f"CN=u{i},DC=x".encode() for i in range(25)]
    conn = FakeConn(values, cap=10)
    e = entry("member;range=0-9", values[:10])
    assert ranges.is_ranged(e)
    ranges.complete(conn, e, page)
    assert e["raw_attributes"]["member"] == values and not ranges.is_ranged(e)
    assert e["raw_attributes"]["cn"] == [b"big"]
    assert conn.asked[0] == ("member;range=10-*" if page is None else "member;range=10-16")


def test_a_gap_or_a_missing_page_is_an_error_never_a_short_list():
    values = [f"CN=u{i},DC=x".encode() for i in range(25)]
    for answer in ({}, {"member;range=12-*": values[12:]}, {"member;range=10-19": []},
                   {"cn": [b"x"]}):
        with pytest.raises(DirectoryError) as err:
            ranges.complete(FakeConn(values, 10, answer=answer), entry("member;range=0-9", values[:10]))
        assert err.value.code == "operation_failed" and "CN=big,DC=x" in err.value.message
    with pytest.raises(DirectoryError):
        ranges.complete(FakeConn(values, 10), entry("member;range=5-9", values[5:10]))


def test_member_range_size_asks_for_pages():
    base = {"name": "ad", "kind": "ad", "servers": ["dc:636"], "tls": "ldaps", "ca_pem": None,
            "ca_file": __file__, "bind_dn": "x", "bind_password": "y", "base_dns": ["DC=x"]}
    config = load_config({**base, "member_range_size": 100})
    assert "member;range=0-99" in search_attributes(config, "group")
    assert "member" in search_attributes(load_config(base), "group")
    for bad in (0, "5", True, 100_001):
        with pytest.raises(DirectoryConfigError):
            load_config({**base, "member_range_size": bad})
    with pytest.raises(DirectoryConfigError):
        load_config({**base, "kind": "openldap", "member_range_size": 10})
