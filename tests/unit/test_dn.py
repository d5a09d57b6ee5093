"""tether.dn: DNs compared by meaning, every RFC 4514 escape form.

References: ldap3's own ``parse_dn`` / ``safe_dn`` must split and accept the
same DNs (where they accept them at all), and slapd's normalisation is checked
against a real server in tests/integration/ldap/test_dn_slapd.py.
"""

from __future__ import annotations

import pytest
from ldap3.core.exceptions import LDAPInvalidDnError
from ldap3.utils.dn import parse_dn, safe_dn

from tether import dn


def _ber_utf8(text: str) -> str:
    data = text.encode()
    return "#0C" + f"{len(data):02X}" + data.hex().upper()


# Each group: spellings that name the same entry.
SAME = [
    ["cn=Smith\\, John,ou=People,dc=example,dc=org",
     "cn=Smith\\2C John,ou=People,dc=example,dc=org",
     "CN=smith\\2c john,OU=people,DC=Example,DC=ORG",
     "cn = Smith\\, John , ou=People,dc=example, dc=org",
     "commonName=Smith\\, John,organizationalUnitName=People,domainComponent=example,dc=org",
     "2.5.4.3=Smith\\, John,2.5.4.11=People,0.9.2342.19200300.100.1.25=example,dc=org",
     "OID.2.5.4.3=Smith\\, John,ou=People,dc=example,dc=org",
     f"cn={_ber_utf8('Smith, John')},ou=People,dc=example,dc=org",
     'cn="Smith, John",ou=People,dc=example,dc=org',
     "cn=Smith\\, John;ou=People;dc=example;dc=org"],
    ["cn=Ren\u00e9e Dupont,dc=x", "cn=Ren\\C3\\A9e Dupont,dc=x", "cn=ren\\c3\\a9e dupont,dc=x",
     "cn=RENE\u0301E DUPONT,dc=x", "cn=Ren\u00e9e  Dupont,dc=x"],
    ["cn=a+uid=b,dc=x", "uid=b+cn=a,dc=x", "UID=B + CN=A,DC=X", "userid=b+commonName=a,dc=x"],
    ["cn=\\#hash,dc=x", "cn=\\23hash,dc=x"],
    ["cn=\\ lead,dc=x", "cn=\\20lead,dc=x", "cn=lead,dc=x"],
    ["cn=trail\\ ,dc=x", "cn=trail\\20,dc=x", "cn=trail,dc=x"],
    ["cn=a\\+b,dc=x", "cn=a\\2Bb,dc=x"],
    ["cn=a\\\"b,dc=x", "cn=a\\22b,dc=x"],
    ["cn=a\\\\b,dc=x", "cn=a\\5Cb,dc=x"],
    ["cn=a\\;b,dc=x", "cn=a\\3Bb,dc=x"],
    ["cn=a\\=b,dc=x", "cn=a\\3Db,dc=x", "cn=a=b,dc=x"],
    ["cn=a\\<b\\>,dc=x", "cn=a\\3Cb\\3E,dc=x"],
    ["cn=\u5f20\u4f1f,dc=x", "cn=\\E5\\BC\\A0\\E4\\BC\\9F,dc=x"],
    ["cn=\u0418\u0432\u0430\u043d,dc=x", "CN=\u0438\u0432\u0430\u043d,DC=X"],
]

DIFFERENT = [
    ("cn=Smith\\, John,dc=x", "cn=Smith John,dc=x"),
    ("cn=a+uid=b,dc=x", "cn=a,uid=b,dc=x"),
    ("cn=a\\+b,dc=x", "cn=a+b=c,dc=x"),
    ("cn=a,dc=x", "uid=a,dc=x"),
    ("cn=#04024142,dc=x", "cn=AB,dc=x"),  # an OCTET STRING is not a string value
    ("cn=a b,dc=x", "cn=ab,dc=x"),
]

MALFORMED = ["cn", "cn=a,", "=a", "cn=a\\", "cn=a\\zz", "cn=a<b", "cn=a>b", 'cn=a"b',
             "c n=a", "1cn=a", "2.5..4=a", "cn=#ABC", "cn=#zz", "cn=\\FF\\FE", "cn=a,,dc=x",
             'cn="open,dc=x', "cn=a+,dc=x"]


@pytest.mark.parametrize("group", SAME, ids=[g[0] for g in SAME])
def test_equivalent_spellings_have_one_key(group):
    keys = {dn.key(s) for s in group}
    assert len(keys) == 1, keys
    assert all(dn.same(group[0], s) for s in group)


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_different_entries_differ(a, b):
    assert dn.key(a) != dn.key(b) and not dn.same(a, b)


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_dn_is_a_clear_error(text):
    with pytest.raises(dn.DNError) as err:
        dn.key(text)
    assert "DN" in str(err.value) or "DN" in str(err.value).upper()
    assert not dn.same(text, text)  # a malformed DN names nothing, not even itself


def test_every_special_character_round_trips_through_the_escape():
    """A value holding each special char, escaped the way ldap3 escapes it, parses back exactly."""
    from ldap3.utils.dn import escape_rdn
    for special in ',+"\\;=<>#':
        for value in (f"a{special}b", f"{special}lead", f"trail{special}"):
            text = f"cn={escape_rdn(value)},dc=x"
            assert dn.parse(text)[0] == [("cn", value)], text
            assert dn.same(text, "cn=" + "".join(f"\\{b:02X}" for b in value.encode()) + ",dc=x")


@pytest.mark.parametrize("text", [
    "cn=Smith\\, John,ou=People,dc=example,dc=org", "cn=a+uid=b,dc=x", "cn=\\#hash,dc=x",
    "cn=\\ lead,dc=x", "cn=trail\\ ,dc=x", "cn=a\\2Bb,dc=x", "cn=Ren\\C3\\A9e,dc=x",
    "cn=a\\\\b,dc=x", "cn=a\\;b\\<c\\>,dc=x"])
def test_splits_like_ldap3(text):
    """ldap3's parse_dn is the reference for where RDNs and AVAs end."""
    theirs = parse_dn(text, escape=False, strip=False)
    ours = [ava for rdn in dn.parse(text) for ava in rdn]
    assert [t.lower() for t, _, _ in theirs] == [t for t, _ in ours]
    assert [s for _, _, s in theirs] == [("+" if i < len(r) - 1 else ",") for r in dn.parse(text)
                                         for i, _ in enumerate(r)][:-1] + [""]
    # and ldap3's normalised spelling means the same entry
    assert dn.same(safe_dn(text), text)


@pytest.mark.parametrize("text", ["cn=a\\zz,dc=x", "cn=a<b,dc=x", "cn=a,", "c n=a,dc=x"])
def test_refuses_what_ldap3_refuses(text):
    with pytest.raises(LDAPInvalidDnError):
        parse_dn(text)
    with pytest.raises(dn.DNError):
        dn.parse(text)


def test_within_is_a_subtree_test_by_meaning():
    assert dn.within("CN=Smith\\2C John,OU=People,DC=Example", "ou=people,dc=example")
    assert dn.within("ou=People,dc=example", "OU = people , DC = EXAMPLE")
    assert not dn.within("cn=x,ou=people2,dc=example", "ou=people,dc=example")
    assert not dn.within("cn=x\\,ou=people,dc=example", "ou=people,dc=example")  # one RDN only
    assert not dn.within("broken", "dc=example")


def test_rdn_value_is_unescaped():
    assert dn.rdn_value("cn=Smith\\2C John,dc=x") == "Smith, John"
    assert dn.rdn_value("CN=frank\\0ADEL:1234,CN=Deleted Objects,DC=x") == "frank\nDEL:1234"


def test_root_and_types():
    assert dn.parse("") == [] and dn.key("") == ""
    with pytest.raises(dn.DNError):
        dn.parse(b"cn=a")  # type: ignore[arg-type]


def test_unescaped_equals_belongs_to_the_value():
    """RFC 4514 lets '=' stand unescaped in a value (ldap3 refuses it; slapd does not)."""
    assert dn.parse("cn=a b c=d,dc=x")[0] == [("cn", "a b c=d")]


def test_split_rdn_respects_escapes_and_quotes():
    assert dn.split_rdn("cn=Smith\\, John,ou=People,dc=x") == ("cn=Smith\\, John", "ou=People,dc=x")
    assert dn.split_rdn('cn="a,b" , dc=x') == ('cn="a,b"', "dc=x")
    assert dn.split_rdn("cn=a\\2Cb+uid=c;dc=x") == ("cn=a\\2Cb+uid=c", "dc=x")
    assert dn.split_rdn("dc=x") == ("dc=x", "")
    with pytest.raises(dn.DNError):
        dn.split_rdn("cn=a\\")


def test_plain_fast_path_agrees_with_the_parser():
    from tether.dn import _full_key
    texts = [t for group in SAME for t in group] + [a for pair in DIFFERENT for a in pair] + [
        "uid=u000,ou=People,dc=example,dc=org", "CN = Joe  Bloggs , OU=x,DC=y", "cn=a=b,dc=x",
        "cn=,dc=x", "o=Acme Inc.,c=US", "commonName=x,domainComponent=y", "cn=a ,dc=x"]
    for text in texts:
        try:
            want = _full_key(text)
        except dn.DNError:
            continue
        assert dn.key.__wrapped__(text) == want, text


def test_keys_built_from_the_parents_key_agree_with_the_whole_parse():
    """key() keys a DN's first RDN and takes its parent's key from the cache: the
    result (or the refusal) must be the whole DN's parse, whatever the spelling."""
    import random

    from tether.dn import _full_key
    draw = random.Random(5)
    types = ["cn", "CN", "ou", "dc", "uid", "2.5.4.3", "oid.2.5.4.3", "commonName", " cn", "cn ",
             "", "1x"]
    values = ["a", "A b", " x", "x ", "\\2C", "\\,", "\\\\", "\\ ", "\\20", "#04024869", "#0",
              "Smith\\, John", "é", "\\c3\\a9", '"q,x"', "a=b", "a+b=c", "+", "\\", "\\x", "#",
              "a\\+b", "  ", "\\#x", ";", "a;b=c", "日本"]
    seps = [",", ",", ", ", " ,", ";", "+", ",,"]
    texts = ["  ,cn=Smith\\, John", "ou=A b,  ", "CN=\\,,  ", "cn=a,  ,dc=x", "cn=\\2C x,  dc=y"]
    for _ in range(5000):
        parts = [draw.choice(types) + draw.choice(["=", "=", " = ", ""]) + draw.choice(values)
                 for _ in range(draw.randint(1, 4))]
        texts.append("".join(p + draw.choice(seps) for p in parts[:-1]) + parts[-1])

    def outcome(fn, text):
        try:
            return fn(text)
        except dn.DNError:
            return "refused"

    for text in texts:
        assert outcome(dn.key.__wrapped__, text) == outcome(_full_key, text), text
