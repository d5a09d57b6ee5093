"""The ``tether-home`` admin CLI as a subprocess: files, modes, contract, errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tether.home import pki

TETHER_HOME = str(Path(sys.executable).parent / "tether-home")


def cli(state: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TETHER_HOME, *args, "--state", str(state)], capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "state"
    result = cli(root, "init", "--name", "home.example.invalid", "--name", "127.0.0.1")
    assert result.returncode == 0, result.stderr
    assert cli(root, "connector", "create", "acme", "--cluster", "emea",
               "--max-instances", "3").returncode == 0
    return root


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_files_and_modes(state):
    assert mode(state) == 0o700
    for name in ("ca.key", "server.key", "config-signing.key", "home.sqlite3"):
        assert mode(state / name) == 0o600, name
    server = x509.load_pem_x509_certificate((state / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((state / "ca.crt").read_bytes())
    assert pki.is_signed_by(server, ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "home.example.invalid" in sans.get_values_for_type(x509.DNSName)
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_init_twice_is_refused(state):
    result = cli(state, "init")
    assert result.returncode == 2
    assert "initialized already" in result.stderr


def test_uninitialized_state_says_what_to_do(tmp_path):
    result = cli(tmp_path / "nothing", "status")
    assert result.returncode == 2
    assert "tether-home init" in result.stderr


def test_state_from_environment(state):
    env = {**os.environ, "TETHER_HOME_STATE": str(state)}
    result = subprocess.run([TETHER_HOME, "connector", "list"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0 and "acme" in result.stdout and "cluster=emea" in result.stdout


def test_image_issue_writes_the_contract_bundle(state, tmp_path):
    out = tmp_path / "deep" / "cred.json"
    result = cli(state, "image", "issue", "--connector", "acme", "--out", str(out),
                 "--home-url", "wss://a.example.invalid/", "--home-url", "wss://b.example.invalid/")
    assert result.returncode == 0, result.stderr
    assert mode(out) == 0o600
    bundle = json.loads(out.read_text())
    assert set(bundle) == {"format", "version", "image_id", "connector", "home_urls", "key_pem",
                           "cert_pem", "ca_pem", "fingerprint", "cert_serial", "update_ca_pem"}
    # issue 14: the image's RAUC keyring is the home's update CA, never its TLS CA
    assert bundle["update_ca_pem"] == (state / "update" / "update-ca.crt").read_text() != bundle["ca_pem"]
    assert bundle["format"] == "tether-image-credential" and bundle["version"] == 1
    assert bundle["home_urls"] == ["wss://a.example.invalid/", "wss://b.example.invalid/"]
    key = serialization.load_pem_private_key(bundle["key_pem"].encode(), None)
    cert = x509.load_pem_x509_certificate(bundle["cert_pem"].encode())
    ca = x509.load_pem_x509_certificate(bundle["ca_pem"].encode())
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert pki.is_signed_by(cert, ca)
    assert bundle["fingerprint"] == pki.spki_fingerprint(key.public_key())
    assert bundle["cert_serial"] == format(cert.serial_number, "x")
    assert bundle["key_pem"].startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert cert.signature_hash_algorithm.name == hashes.SHA256().name
    status = json.loads(cli(state, "status", "--json").stdout)
    assert bundle["image_id"] in [i["image_id"] for i in status["images"]]


@pytest.mark.parametrize("args, needle", [
    (["image", "issue", "--connector", "nope", "--out", "/tmp/never.json"], "no connector"),
    (["image", "issue", "--connector", "acme", "--out", "/tmp/never.json",
      "--home-url", "http://x/"], "wss://"),
    (["connector", "create", "acme"], "exists already"),
    (["connector", "create", "Bad Name"], "must be"),
    (["connector", "create", "zero", "--max-instances", "0"], "at least 1"),
    (["connector", "set", "acme"], "give --cluster"),
    (["connector", "set", "nope", "--max-instances", "2"], "no connector"),
    (["connector", "set", "acme", "--max-instances", "0"], "at least 1"),
    (["revoke", "abcdef"], "no certificate"),
    (["revoke"], "exactly one"),
    (["revoke", "--instance", "nope"], "no instance"),
    (["revoke", "--image", "nope"], "no image"),
    (["config", "show", "acme", "--version", "99"], "no version 99"),
    (["config", "show", "nope"], "no connector"),
])
def test_bad_input_gets_clear_errors(state, args, needle):
    result = cli(state, *args)
    assert result.returncode == 2, result
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_config_set_versions_and_show(state, tmp_path):
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    first.write_text(json.dumps({"directories": [], "proxy": None}))
    second.write_text(json.dumps({"directories": [{"name": "ad"}]}))
    assert "version 1" in cli(state, "config", "set", "acme", str(first)).stdout
    out = cli(state, "config", "set", "acme", str(second)).stdout
    assert "version 2" in out and "not running" in out
    shown = json.loads(cli(state, "config", "show", "acme").stdout)
    assert shown["version"] == 2 and shown["versions"] == [1, 2]
    assert shown["config"] == {"directories": [{"name": "ad"}]}
    old = json.loads(cli(state, "config", "show", "acme", "--version", "1").stdout)
    assert old["config"]["proxy"] is None


@pytest.mark.parametrize("content, needle", [
    ("{broken", "not valid JSON"), ("[1, 2]", "JSON object"), ('{"x": NaN}', "plain JSON"),
])
def test_config_set_refuses_bad_files(state, tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = cli(state, "config", "set", "acme", str(path))
    assert result.returncode == 2 and needle in result.stderr
    assert cli(state, "config", "set", "acme", str(tmp_path / "missing.json")).returncode == 2


def test_revoke_marks_image(state, tmp_path):
    out = tmp_path / "r.json"
    cli(state, "image", "issue", "--connector", "acme", "--out", str(out))
    serial = json.loads(out.read_text())["cert_serial"]
    result = cli(state, "revoke", serial.upper(), "--reason", "test")
    assert result.returncode == 0 and f"revoked image certificate {serial}" in result.stdout
    status = json.loads(cli(state, "status", "--json").stdout)
    assert next(i for i in status["images"] if i["cert_serial"] == serial)["revoked"]
    assert "REVOKED" in cli(state, "status").stdout
    image_id = json.loads(out.read_text())["image_id"]
    again = cli(state, "revoke", "--image", image_id)
    assert again.returncode == 0 and serial in again.stdout


def test_serve_bad_listen(state):
    result = cli(state, "serve", "--listen", "nonsense")
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


def test_serve_port_in_use_says_so(state):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(state, "serve", "--listen", f"127.0.0.1:{port}")
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_image_issue_warns_about_urls_the_server_cert_does_not_name(state, tmp_path):
    out = tmp_path / "w.json"
    result = cli(state, "image", "issue", "--connector", "acme", "--out", str(out),
                 "--home-url", "wss://home.example.invalid:443/",
                 "--home-url", "wss://127.0.0.1:8443/", "--home-url", "wss://other.invalid/")
    assert result.returncode == 0
    assert "other.invalid" in result.stderr and "warning" in result.stderr
    assert "home.example.invalid" not in result.stderr and "127.0.0.1" not in result.stderr


def test_state_before_or_after_the_command(state):
    before = subprocess.run([TETHER_HOME, "--state", str(state), "connector", "list"],
                            capture_output=True, text=True, timeout=60)
    after = cli(state, "connector", "list")
    assert before.returncode == after.returncode == 0
    assert before.stdout == after.stdout and "acme" in before.stdout


def test_server_cert_reissue_keeps_or_changes_names(state):
    before = x509.load_pem_x509_certificate((state / "server.crt").read_bytes())
    same = cli(state, "server-cert")
    assert same.returncode == 0 and "home.example.invalid, 127.0.0.1" in same.stdout
    renamed = cli(state, "server-cert", "--name", "new.example.invalid")
    assert renamed.returncode == 0
    after = x509.load_pem_x509_certificate((state / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((state / "ca.crt").read_bytes())
    assert after.serial_number != before.serial_number and pki.is_signed_by(after, ca)
    sans = after.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["new.example.invalid"]
    assert mode(state / "server.key") == 0o600
    cli(state, "server-cert", "--name", "home.example.invalid", "--name", "127.0.0.1")


def test_connector_set_changes_policy(state):
    result = cli(state, "connector", "set", "acme", "--max-instances", "5")
    assert result.returncode == 0 and "max-instances 5" in result.stdout
    assert "max-instances=5" in cli(state, "connector", "list").stdout
    cli(state, "connector", "set", "acme", "--max-instances", "3")
