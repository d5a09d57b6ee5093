"""Agent configuration store: signature check, rollback refusal, last good on disk."""

import json

import pytest

from tether import configsig, sealing
from tether.agent.config import CONFIG_FILE, ConfigStore


@pytest.fixture
def home_key():
    return configsig.generate_signing_key()


@pytest.fixture
def store(tmp_path, home_key):
    s = ConfigStore(tmp_path, "corp", sealing.generate_private_key())
    s.instance_id = "inst-1"
    s.set_verify_key(configsig.public_key_pem(home_key))
    return s


def signed(home_key, store, version, config=None, connector="corp"):
    config = config if config is not None else {
        "directories": [{"name": "ad", "bind_password": "S3cret!"}],
        "agent": {"sockets": 3}}
    sealed = configsig.seal_secrets(
        config, lambda pt, aad: sealing.seal(store.sealing_key.public_key(), pt, aad))
    return configsig.sign_config(home_key, sealed, version=version, connector=connector,
                                 instance_id="inst-1")


def test_apply_persists_sealed_and_opens_in_memory(store, home_key, tmp_path):
    result = store.apply(signed(home_key, store, 1))
    assert result.version == 1 and result.changed
    assert store.secrets_open["directories"][0]["bind_password"] == "S3cret!"
    on_disk = (tmp_path / CONFIG_FILE).read_text()
    assert "S3cret!" not in on_disk and "tether-sealed:v1:" in on_disk
    assert store.channel_overrides() == {"sockets": 3}
    assert not store.apply(signed(home_key, store, 1)).changed


def test_tampered_document_refused_last_good_kept(store, home_key, tmp_path):
    store.apply(signed(home_key, store, 1))
    before = (tmp_path / CONFIG_FILE).read_bytes()
    doc = signed(home_key, store, 2)
    doc["payload"]["config"]["agent"]["sockets"] = 8
    with pytest.raises(configsig.ConfigSignatureError) as info:
        store.apply(doc)
    assert info.value.code == "bad_signature"
    assert store.version == 1 and (tmp_path / CONFIG_FILE).read_bytes() == before


def test_other_signer_rollback_and_wrong_connector(store, home_key):
    store.apply(signed(home_key, store, 5))
    with pytest.raises(configsig.ConfigSignatureError):
        store.apply(signed(configsig.generate_signing_key(), store, 6))
    with pytest.raises(configsig.ConfigVersionError):
        store.apply(signed(home_key, store, 4))
    with pytest.raises(configsig.ConfigTargetError):
        store.apply(signed(home_key, store, 6, connector="other"))
    assert store.version == 5


def test_secret_sealed_to_another_instance_refused(store, home_key):
    other = sealing.generate_private_key()
    config = configsig.seal_secrets({"bind_password": "x"},
                                    lambda pt, aad: sealing.seal(other.public_key(), pt, aad))
    doc = configsig.sign_config(home_key, config, version=1, connector="corp")
    with pytest.raises(configsig.ConfigError, match="does not open"):
        store.apply(doc)
    assert store.version is None


def test_last_good_survives_restart_and_edit_is_refused(store, home_key, tmp_path):
    store.apply(signed(home_key, store, 3))
    again = ConfigStore(tmp_path, "corp", store.sealing_key)
    again.instance_id = "inst-1"
    assert again.load_last_good() and again.version == 3
    assert again.secrets_open["directories"][0]["bind_password"] == "S3cret!"
    doc = json.loads((tmp_path / CONFIG_FILE).read_text())
    doc["payload"]["version"] = 99
    (tmp_path / CONFIG_FILE).write_text(json.dumps(doc))
    edited = ConfigStore(tmp_path, "corp", store.sealing_key)
    assert not edited.load_last_good() and edited.version is None
    assert edited.last_error.code == "bad_signature"


def test_unknown_verify_key(tmp_path):
    s = ConfigStore(tmp_path, "corp", sealing.generate_private_key())
    with pytest.raises(configsig.ConfigSignatureError, match="not enrolled"):
        s.apply({"format": "tether-config"})
    with pytest.raises(configsig.ConfigError):
        s.set_verify_key("not a key")
