"""The identity role's checks of the credential bundle, run for real on the controller.

Only the role's bundle.yml runs (it reads the bundle on the build host and never
touches a guest), so bad bundles are tried without a VM.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent

PLAY = """
- name: Check a credential bundle
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Run the identity role's bundle checks
      ansible.builtin.import_role:
        name: identity
        tasks_from: bundle.yml
"""


def _bundle() -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test home CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    image_id = str(uuid.uuid4())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, image_id)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = serialization.Encoding.PEM
    return {
        "format": "tether-image-credential", "version": 1, "image_id": image_id, "connector": "test",
        "home_urls": ["wss://home.tether.invalid:443/"],
        "key_pem": key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode(),
        "cert_pem": cert.public_bytes(pem).decode(), "ca_pem": ca.public_bytes(pem).decode(),
        "fingerprint": hashlib.sha256(spki).hexdigest(), "cert_serial": f"{cert.serial_number:x}",
    }


def _check(tmp_path: Path, content: str | None, *extra: str) -> subprocess.CompletedProcess:
    playbook = tmp_path / "check.yml"
    playbook.write_text(PLAY)
    bundle = tmp_path / "bundle.json"
    if content is not None:
        bundle.write_text(content)
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(ANSIBLE / "roles"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", str(playbook),
                           "-e", f"tether_credential={bundle}", *extra],
                          env=env, capture_output=True, text=True, check=False)


def _key_body(bundle: dict) -> str:
    """A line of the private key's base64 body: it must never show up in output."""
    return bundle["key_pem"].splitlines()[1]


@pytest.fixture(scope="module")
def good() -> dict:
    return _bundle()


def test_good_bundle_passes(tmp_path, good):
    proc = _check(tmp_path, json.dumps(good), "-e", f"tether_image_id={good['image_id']}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _key_body(good) not in proc.stdout + proc.stderr, "the private key must never be printed"


def test_missing_bundle(tmp_path):
    proc = _check(tmp_path, None)
    assert proc.returncode != 0
    assert "tether-home image issue" in proc.stdout + proc.stderr


def test_not_json(tmp_path):
    proc = _check(tmp_path, "this is not json {")
    assert proc.returncode != 0
    assert "is not valid JSON" in proc.stdout + proc.stderr


@pytest.mark.parametrize("change", [
    {"format": "something-else"},
    {"version": 2},
    {"fingerprint": "abc"},
    {"home_urls": "wss://not-a-list/"},
    {"home_urls": ["http://plain/"]},
    {"key_pem": "not a key"},
])
def test_malformed_bundle(tmp_path, good, change):
    proc = _check(tmp_path, json.dumps({**good, **change}))
    assert proc.returncode != 0
    assert "is not a valid image credential bundle" in proc.stdout + proc.stderr
    assert _key_body(good) not in proc.stdout + proc.stderr, "the private key must never be printed"


def test_missing_field_is_named(tmp_path, good):
    bundle = {k: v for k, v in good.items() if k != "cert_pem"}
    proc = _check(tmp_path, json.dumps(bundle))
    assert proc.returncode != 0
    assert "missing fields: cert_pem" in " ".join((proc.stdout + proc.stderr).split())


def test_image_id_must_match_the_build(tmp_path, good):
    proc = _check(tmp_path, json.dumps(good), "-e", f"tether_image_id={uuid.uuid4()}")
    assert proc.returncode != 0
