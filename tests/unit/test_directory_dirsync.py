"""DirSync control bytes and applying changed member values (agent/directory/dirsync.py)."""

from __future__ import annotations

from pyasn1.codec.ber import decoder
from ldap3.protocol.microsoft import DirSyncControlRequestValue

from tether.agent.directory import dirsync


def test_the_control_carries_the_flags_as_the_4_bytes_ad_reads():
    oid, critical, value = dirsync.control(b"\x01\x02cookie")
    assert oid == "1.2.840.113556.1.4.841" and critical is True
    parsed, rest = decoder.decode(value, asn1Spec=DirSyncControlRequestValue())
    assert rest == b""
    # INCREMENTAL_VALUES | OBJECT_SECURITY as a signed 32-bit INTEGER: 4 bytes, not 5
    assert value[2:8] == b"\x02\x04\x80\x00\x00\x01"
    assert int(parsed["Flags"]) & 0xFFFFFFFF == 0x80000001
    assert int(parsed["MaxBytes"]) == dirsync.MAX_BYTES
    assert bytes(parsed["Cookie"]) == b"\x01\x02cookie"


def test_a_cookie_survives_the_cursor():
    raw = bytes(range(256))
    assert dirsync.decode_cookie(dirsync.encode_cookie(raw)) == raw


def test_changed_values_apply_to_the_held_list():
    held = frozenset({"CN=a,DC=x", "CN=b,DC=x", "CN=c,DC=x"})
    assert dirsync.apply(held, {"CN=d,DC=x": True, "CN=a,DC=x": False}) == \
        ["CN=b,DC=x", "CN=c,DC=x", "CN=d,DC=x"]
    assert dirsync.apply(held, {"CN=b,DC=x": True}) == sorted(held)  # present already: as is
    assert dirsync.apply(held, None) == sorted(held)  # other attributes changed only
    assert dirsync.apply(held, {}) == sorted(held)


def test_anything_doubtful_reads_the_group_whole():
    held = frozenset({"CN=a,DC=x"})
    assert dirsync.apply(None, {"CN=d,DC=x": True}) is None  # nothing held
    assert dirsync.apply(held, {"CN=z,DC=x": False}) is None  # a removal the list does not hold
    assert dirsync.apply(held, {dirsync.WHOLE: True}) is None  # the server sent a whole list
