"""wire.parse_entry against ldap3's own decoder, on hand-built BER (short and long lengths)."""

from __future__ import annotations

from ldap3.operation.search import search_result_entry_response_to_dict_fast
from ldap3.utils.asn1 import decode_message_fast

from tether.agent.directory import wire


def tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        head = bytes([n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        head = bytes([0x80 | len(size)]) + size
    return bytes([tag]) + head + value


def entry_message(msg_id: int, dn: str, attrs: dict[str, list[bytes]]) -> bytes:
    partial = b"".join(tlv(0x30, tlv(0x04, name.encode()) + tlv(0x31, b"".join(tlv(0x04, v) for v in vals)))
                       for name, vals in attrs.items())
    op = tlv(0x64, tlv(0x04, dn.encode()) + tlv(0x30, partial))
    return tlv(0x30, tlv(0x02, msg_id.to_bytes(2, "big")) + op)


def ldap3_view(msg: bytes) -> dict:
    decoded = decode_message_fast(msg)
    entry = search_result_entry_response_to_dict_fast(decoded["payload"], None, None, False)
    return {"dn": entry["dn"], "raw_dn": entry["raw_dn"],
            "raw_attributes": {k: v or [] for k, v in entry["raw_attributes"].items()}}


def test_parse_entry_matches_ldap3():
    cases = [
        ("uid=a,dc=x", {"uid": [b"a"], "entryUUID": [b"1234"]}),
        ("cn=grp,ou=gr\xfcppen,dc=x", {"cn": [b"grp"], "member": [f"uid=u{i:05d},dc=x".encode() for i in range(3000)]}),
        ("uid=bin,dc=x", {"objectGUID": [bytes(range(16))], "mail": [], "photo": [b"\x00" * 70000]}),
    ]
    for n, (dn, attrs) in enumerate(cases, start=1):
        msg = entry_message(300 + n, dn, attrs)
        strategy = wire.FastSyncStrategy.__new__(wire.FastSyncStrategy)
        msg_id, entry = strategy._decode(msg)
        assert msg_id == 300 + n
        assert entry["type"] == "searchResEntry"
        assert {k: entry[k] for k in ("dn", "raw_dn", "raw_attributes")} == ldap3_view(msg)


def test_range_attributes_keep_their_names_on_the_fast_path():
    """AD splits big multi-valued attributes (`member;range=0-1499`): the fast path keeps the
    ranged name, so ranges.complete sees it and reads the other pages."""
    msg = entry_message(7, "cn=big,dc=x", {"member;range=0-1": [b"a", b"b"], "objectGUID": [bytes(16)]})
    strategy = wire.FastSyncStrategy.__new__(wire.FastSyncStrategy)
    msg_id, entry = strategy._decode(msg)
    assert msg_id == 7
    assert entry["raw_attributes"]["member;range=0-1"] == [b"a", b"b"]
