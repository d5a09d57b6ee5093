"""Binary attribute values: decided by the schema or the mapping, never by decoding."""

from __future__ import annotations

import base64
import os
import uuid

import pytest

from tether.agent.directory.config import load_config
from tether.agent.directory.errors import DirectoryConfigError
from tether.agent.directory.mapping import to_record
from tether.agent.directory.values import Syntaxes, encode, sid_bytes, sid_text

# A JPEG header: not UTF-8, and what `errors="replace"` used to destroy.
JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffdb0043") + os.urandom(64)
#: attributeTypes as slapd's core/cosine/inetorgperson schemas define them (jpegPhoto via SYNTAX,
#: photo-like via SUP, cn text via SUP name)
OPENLDAP_TYPES = [
    "( 2.5.4.41 NAME 'name' EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{32768} )",
    "( 2.5.4.3 NAME ( 'cn' 'commonName' ) DESC 'RFC4519: common name(s)' SUP name )",
    "( 0.9.2342.19200300.100.1.60 NAME 'jpegPhoto' SYNTAX 1.3.6.1.4.1.1466.115.121.1.28 )",
    "( 1.2.3.4 NAME 'myBlob' SUP jpegPhoto )",
    "( 2.5.4.36 NAME 'userCertificate' SYNTAX 1.3.6.1.4.1.1466.115.121.1.8 )",
    "( 1.3.6.1.1.16.4 NAME 'entryUUID' SYNTAX 1.3.6.1.1.16.1 SINGLE-VALUE NO-USER-MODIFICATION )",
]
AD_TYPES = [  # Samba/AD quote the syntax OID
    "( 1.2.840.113556.1.4.221 NAME 'sAMAccountName' SYNTAX '1.3.6.1.4.1.1466.115.121.1.15' SINGLE-VALUE )",
    "( 2.5.4.3 NAME 'cn' SYNTAX '1.3.6.1.4.1.1466.115.121.1.15' SINGLE-VALUE )",
    "( 1.2.840.113556.1.2.9999 NAME 'thumbnailPhoto' SYNTAX '1.3.6.1.4.1.1466.115.121.1.40' SINGLE-VALUE )",
    "( 1.2.840.113556.1.4.146 NAME 'objectSid' SYNTAX '1.3.6.1.4.1.1466.115.121.1.40' SINGLE-VALUE )",
]


@pytest.fixture
def cfg(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    base = {"servers": ["h"], "ca_file": str(ca), "bind_dn": "cn=a", "bind_password": "p",
            "base_dns": ["dc=x"]}
    return lambda **kw: load_config({**base, **kw})


def test_schema_decides_binary_following_sup():
    s = Syntaxes()
    s.load_definitions(OPENLDAP_TYPES)
    assert [s.encoding(a) for a in ("jpegPhoto", "JPEGPHOTO", "myBlob", "userCertificate;binary",
                                    "cn", "commonName", "entryUUID")] == \
        ["base64", "base64", "base64", "base64", "text", "text", "text"]
    ad = Syntaxes()
    ad.load_definitions(AD_TYPES)
    assert ad.encoding("thumbnailPhoto") == "base64" and ad.encoding("sAMAccountName") == "text"
    assert ad.encoding("objectSid") == "sid" and ad.encoding("objectGUID") == "uuid"


def test_forced_and_fallback():
    assert Syntaxes(("myPhoto",)).encoding("myphoto") == "base64"
    unread = Syntaxes()  # schema unreadable: the well-known binary attributes only
    assert unread.encoding("jpegPhoto") == "base64" and unread.encoding("cn") == "text"


def test_jpeg_round_trips_byte_for_byte(cfg):
    config = cfg(attribute_mapping={"user": {"username": "uid", "photo": "jpegPhoto"}})
    config.syntaxes.load_definitions(OPENLDAP_TYPES)
    raw = {"entryUUID": [b"0e9903dc-7d5a-1041-9568-1db57c4ca981"], "uid": [b"al\xc3\xafce"],
           "jpegPhoto": [JPEG]}
    rec = to_record(config, "user", "uid=alice,dc=x", raw)
    assert base64.b64decode(rec["attributes"]["photo"]) == JPEG
    assert rec["encodings"] == {"photo": "base64"} and "problems" not in rec
    assert rec["attributes"]["username"] == "al\u00efce"


def test_valid_utf8_bytes_in_binary_attribute_stay_base64(cfg):
    """Never by trying to decode: bytes that happen to be text are still base64."""
    config = cfg(attribute_mapping={"user": {"photo": "jpegPhoto"}})
    config.syntaxes.load_definitions(OPENLDAP_TYPES)
    rec = to_record(config, "user", "uid=a,dc=x", {"entryUUID": [b"u"], "jpegPhoto": [b"hello"]})
    assert rec["attributes"]["photo"] == base64.b64encode(b"hello").decode()


def test_binary_in_a_text_attribute_is_kept_and_reported(cfg):
    config = cfg(attribute_mapping={"user": {"name": "cn"}})
    config.syntaxes.load_definitions(OPENLDAP_TYPES)
    rec = to_record(config, "user", "uid=a,dc=x", {"entryUUID": [b"u"], "cn": [JPEG]})
    assert base64.b64decode(rec["attributes"]["name"]) == JPEG
    assert rec["encodings"] == {"name": "base64"}
    [problem] = rec["problems"]
    assert problem["code"] == "binary_in_text" and problem["attribute"] == "cn"
    assert "\ufffd" not in str(rec)


def test_ad_guid_and_sid_canonical(cfg):
    config = cfg(kind="ad", attribute_mapping={"user": {"username": "sAMAccountName",
                                                        "guid": "objectGUID", "sid": "objectSid"}})
    guid = uuid.uuid4()
    sid = "S-1-5-21-3623811015-3361044348-30300820-1013"
    raw = {"objectGUID": [guid.bytes_le], "objectSid": [sid_bytes(sid)], "sAMAccountName": [b"bob"]}
    rec = to_record(config, "user", "CN=bob,DC=x", raw)
    assert rec["attributes"]["guid"] == str(guid) and rec["attributes"]["sid"] == sid
    assert rec["encodings"] == {"guid": "uuid", "sid": "sid"}
    assert sid_bytes(sid_text(sid_bytes(sid))) == sid_bytes(sid)


def test_malformed_guid_or_sid_falls_back_to_base64():
    assert encode([b"\x01\x02"], "sid")[:2] == (["AQI="], "base64")
    assert encode([b"\x01"], "uuid")[:2] == (["AQ=="], "base64")


def test_member_value_not_utf8_is_escaped_not_replaced(cfg):
    config = cfg()
    rec = to_record(config, "group", "cn=g,dc=x", {"entryUUID": [b"g"], "member": [b"cn=\xff,dc=x"]})
    assert rec["members"] == ["cn=\\ff,dc=x"]


def test_binary_attributes_config_checked(cfg):
    assert cfg(binary_attributes=["myPhoto"]).syntaxes.encoding("MYPHOTO") == "base64"
    with pytest.raises(DirectoryConfigError, match="binary_attributes"):
        cfg(binary_attributes="jpegPhoto")
