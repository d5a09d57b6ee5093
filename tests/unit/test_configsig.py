"""tether.configsig: signing, verification, tamper detection, sealed secrets."""

from __future__ import annotations

import copy

import pytest

from tether import configsig as cs
from tether import sealing

CONFIG = {"directories": [{"name": "ad", "url": "ldaps://dc1.example.invalid",
                           "bind_dn": "cn=svc", "bind_password": "s3cret"}],
          "schedule": {"incremental_seconds": 60}, "proxy": None}


@pytest.fixture(scope="module")
def key():
    return cs.generate_signing_key()


def signed(key, **kw):
    kw.setdefault("version", 3)
    kw.setdefault("connector", "acme")
    return cs.sign_config(key, copy.deepcopy(CONFIG), **kw)


def test_sign_then_verify(key):
    result = cs.verify_config(key.public_key(), signed(key), connector="acme")
    assert result.version == 3 and result.config == CONFIG
    assert result.key_id == cs.key_id(key.public_key())


def test_canonical_json_is_order_independent():
    assert cs.canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == \
        cs.canonical_json({"a": [1, {"c": 3, "d": 2}], "b": 1})
    with pytest.raises(cs.ConfigFormatError):
        cs.canonical_json({"x": float("nan")})


@pytest.mark.parametrize("mutate", [
    lambda d: d["payload"]["config"]["directories"][0].update(url="ldap://evil.invalid"),
    lambda d: d["payload"].update(version=99),
    lambda d: d["payload"].update(connector="other"),
    lambda d: d["payload"]["config"].update(extra=True),
])
def test_tampered_config_fails_with_signature_error(key, mutate):
    document = signed(key)
    mutate(document)
    with pytest.raises(cs.ConfigSignatureError) as info:
        cs.verify_config(key.public_key(), document)
    assert info.value.code == "bad_signature"


def test_other_key_fails(key):
    other = cs.generate_signing_key()
    with pytest.raises(cs.ConfigSignatureError):
        cs.verify_config(other.public_key(), signed(key))


@pytest.mark.parametrize("document", [
    None, [], {"format": "x"}, {"format": cs.FORMAT, "payload": {}, "signature": 1},
])
def test_not_a_document(key, document):
    with pytest.raises(cs.ConfigFormatError):
        cs.verify_config(key.public_key(), document)


def test_garbage_signature(key):
    document = signed(key)
    document["signature"] = "!!!"
    with pytest.raises(cs.ConfigSignatureError):
        cs.verify_config(key.public_key(), document)
    document["signature"] = "AAAA"
    with pytest.raises(cs.ConfigSignatureError):
        cs.verify_config(key.public_key(), document)


def test_rollback_refused_same_version_accepted(key):
    document = signed(key, version=3)
    with pytest.raises(cs.ConfigVersionError) as info:
        cs.verify_config(key.public_key(), document, min_version=4)
    assert info.value.code == "stale_config"
    assert cs.verify_config(key.public_key(), document, min_version=3).version == 3


def test_wrong_connector_or_instance(key):
    document = signed(key, instance_id="i-1")
    with pytest.raises(cs.ConfigTargetError):
        cs.verify_config(key.public_key(), document, connector="other")
    with pytest.raises(cs.ConfigTargetError):
        cs.verify_config(key.public_key(), document, instance_id="i-2")


@pytest.mark.parametrize("version", [0, -1, True, "1"])
def test_sign_refuses_bad_version(key, version):
    with pytest.raises(cs.ConfigFormatError):
        cs.sign_config(key, {}, version=version, connector="a")


def test_key_pem_round_trip(key):
    loaded = cs.load_private_key(cs.private_key_pem(key))
    pub = cs.load_public_key(cs.public_key_pem(key))
    cs.verify_config(pub, cs.sign_config(loaded, {}, version=1, connector="a"))
    with pytest.raises(cs.ConfigError):
        cs.load_public_key(b"not pem")


def test_secrets_sealed_to_instance_and_bound_to_field(key):
    instance = sealing.generate_private_key()
    sealed = cs.seal_secrets(CONFIG, lambda pt, aad: sealing.seal(instance.public_key(), pt, aad))
    field = sealed["directories"][0]["bind_password"]
    assert sealing.is_sealed(field) and "s3cret" not in str(sealed)
    document = cs.sign_config(key, sealed, version=1, connector="acme")
    result = cs.verify_config(key.public_key(), document)
    opened = cs.unseal_secrets(result.config, lambda s, aad: sealing.unseal(instance, s, aad))
    assert opened == CONFIG
    moved = copy.deepcopy(sealed)
    moved["directories"][0]["password"] = moved["directories"][0].pop("bind_password")
    with pytest.raises(sealing.UnsealError):
        cs.unseal_secrets(moved, lambda s, aad: sealing.unseal(instance, s, aad))
