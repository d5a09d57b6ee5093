"""Atomic state files, settings sources, instance identity, sd_notify, journald."""

import datetime as dt
import json
import logging
import os
import socket
import stat
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether import sealing
from tether import atomicfile
from tether.agent import instancekeys, journal, sdnotify, settings


def test_write_atomic_replaces_with_mode(tmp_path):
    target = tmp_path / "config.json"
    atomicfile.write_atomic(target, b"one")
    atomicfile.write_atomic(target, b"two", mode=0o640)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_write_atomic_leaves_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    atomicfile.write_atomic(target, b"good")

    def boom(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomicfile.write_atomic(target, b"new")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def write_etc(tmp_path, **over):
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    data = {"image_id": "img-1", "connector": "corp", "home_urls": ["wss://home:443/"],
            "fingerprint": "ab", "cert_serial": "01", **over}
    (etc / "agent.json").write_text(json.dumps(data))
    return etc


def test_settings_from_agent_json_and_firstboot(tmp_path):
    etc = write_etc(tmp_path)
    s = settings.load(etc, tmp_path / "state", tmp_path / "absent.json")
    assert s.home_urls == ["wss://home:443/"] and s.proxy is None and s.sockets == 2
    fb = tmp_path / "firstboot.json"
    fb.write_text(json.dumps({"home_urls": ["wss://a:1/", "wss://b:2/"],
                              "proxy": "http://u:p@proxy:3128"}))
    s = settings.load(etc, tmp_path / "state", fb)
    assert s.home_urls == ["wss://a:1/", "wss://b:2/"]
    assert s.proxy == "http://u:p@proxy:3128" and s.sources[-1] == str(fb)
    assert s.image_key == etc / "image.key"


@pytest.mark.parametrize("over,message", [
    ({"home_urls": []}, "non-empty list"),
    ({"home_urls": ["https://x/"]}, "wss://host"),
    ({"connector": ""}, "'connector' is missing"),
    ({"proxy": "socks5://x:1"}, "http://"),
])
def test_settings_errors_say_what(tmp_path, over, message):
    etc = write_etc(tmp_path, **over)
    with pytest.raises(settings.SettingsError, match=message):
        settings.load(etc, tmp_path / "state", None)


def test_settings_missing_file(tmp_path):
    with pytest.raises(settings.SettingsError, match="--etc"):
        settings.load(tmp_path, tmp_path, None)


def test_instance_keys_made_once_0600(tmp_path):
    state = tmp_path / "state"
    keys, created = instancekeys.load_or_create_keys(state)
    assert created
    for name in ("instance.key", "sealing.key"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    again, created = instancekeys.load_or_create_keys(state)
    assert not created and again.sealing_public == keys.sealing_public
    assert sealing.unseal(again.sealing, sealing.seal(keys.sealing_public, b"pw")) == b"pw"


def test_loose_key_mode_refused(tmp_path):
    instancekeys.load_or_create_keys(tmp_path)
    os.chmod(tmp_path / "instance.key", 0o644)
    with pytest.raises(instancekeys.InstanceKeyError, match="0600"):
        instancekeys.load_or_create_keys(tmp_path)


def issue(ca_key, ca_name, public_key, days=1, start=None):
    start = start or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    return (x509.CertificateBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "instance")]))
        .issuer_name(ca_name).public_key(public_key).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .sign(ca_key, hashes.SHA256()))


@pytest.fixture
def ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "home CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2040, 1, 1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization
    return key, name, cert.public_bytes(serialization.Encoding.PEM)


def test_csr_and_issued_cert_checks(tmp_path, ca):
    from cryptography.hazmat.primitives import serialization
    ca_key, ca_name, ca_pem = ca
    keys, _ = instancekeys.load_or_create_keys(tmp_path)
    csr = x509.load_pem_x509_csr(instancekeys.make_csr(keys, "img-1").encode())
    assert csr.is_signature_valid
    cert = issue(ca_key, ca_name, csr.public_key())
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    instancekeys.store_cert(tmp_path, instancekeys.check_issued_cert(pem, keys, ca_pem))
    assert instancekeys.load_cert(tmp_path).serial_number == cert.serial_number
    other = issue(ca_key, ca_name, ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(instancekeys.InstanceKeyError, match="another key"):
        instancekeys.check_issued_cert(other.public_bytes(serialization.Encoding.PEM).decode(),
                                   keys, ca_pem)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = issue(rogue_key, ca_name, csr.public_key())
    with pytest.raises(instancekeys.InstanceKeyError, match="signature|CA"):
        instancekeys.check_issued_cert(rogue.public_bytes(serialization.Encoding.PEM).decode(),
                                   keys, ca_pem)


def test_renewal_after_two_thirds(ca):
    ca_key, ca_name, _ = ca
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    cert = issue(ca_key, ca_name, ec.generate_private_key(ec.SECP256R1()).public_key(),
                 days=3, start=start)
    assert instancekeys.renew_at(cert) == start + dt.timedelta(days=2)
    assert not instancekeys.needs_renewal(cert, start + dt.timedelta(days=1, hours=23))
    assert instancekeys.needs_renewal(cert, start + dt.timedelta(days=2))
    assert not instancekeys.is_expired(cert, start + dt.timedelta(days=2))
    assert instancekeys.is_expired(cert, start + dt.timedelta(days=3))


def test_sd_notify_sends_datagrams(tmp_path):
    path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    try:
        n = sdnotify.SystemdNotifier(path)
        assert n.ready("connected") and n.watchdog()
        assert receiver.recv(100) == b"READY=1\nSTATUS=connected"
        assert receiver.recv(100) == b"WATCHDOG=1"
        n.close()
    finally:
        receiver.close()
    assert not sdnotify.SystemdNotifier("").ready()


def test_watchdog_interval():
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "30000000",
                                         "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval_s({}) is None


def test_journal_native_encoding_and_handler(tmp_path):
    encoded = journal.encode_entry({"MESSAGE": "a\nb", "PRIORITY": "6"})
    assert encoded == b"MESSAGE\n" + struct.pack("<Q", 3) + b"a\nb\n" + b"PRIORITY=6\n"
    path = str(tmp_path / "journal")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    try:
        handler = journal.JournalHandler(path)
        log = logging.getLogger("tether.test.journal")
        log.addHandler(handler)
        log.propagate = False
        log.warning("dial failed", extra={"tether_url": "wss://h/"})
        entry = receiver.recv(4096).decode()
        handler.close()
    finally:
        receiver.close()
    assert "MESSAGE=dial failed\n" in entry and "PRIORITY=4\n" in entry
    assert "TETHER_URL=wss://h/\n" in entry and "SYSLOG_IDENTIFIER=tether-agent" in entry


def test_proxy_from_config_overrides_firstboot_and_takes_sealed_password(tmp_path):
    from tether.agent.config import ConfigStore
    from tether.agent.configapply import ConfigApplier

    etc = write_etc(tmp_path, proxy="http://first:boot@proxy-a:3128")
    config = ConfigApplier(ConfigStore(tmp_path, "corp", sealing.generate_private_key()),
                           settings.load(etc, tmp_path / "state", None))
    assert config.proxy() == "http://first:boot@proxy-a:3128"
    config.store.secrets_open = {"agent": {"proxy": "http://svc@proxy-b:8080",
                                           "proxy_password": "p@ss/word"}}
    assert config.proxy() == "http://svc:p%40ss%2Fword@proxy-b:8080"
    config.store.secrets_open = {"agent": {"proxy": ""}}
    assert config.proxy() is None  # home can switch the proxy off
