"""Enrollment policy, identity gate and PKI of home, on a temporary state dir (no sockets)."""

from __future__ import annotations

import http
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether import sealing
from tether.home import admin, enroll, gate, pki
from tether.home.errors import HomeError
from tether.home.paths import StatePaths
from tether.home.server import load_authority
from tether.home.store import Store
from tether.protocol import ErrorCode


@pytest.fixture
def home(tmp_path):
    paths = StatePaths(tmp_path / "state")
    admin.init(paths, ["127.0.0.1"])
    admin.create_connector(paths, "ova", None, 1)
    admin.create_connector(paths, "ami", "cloud", 2)
    store = Store(paths.db)
    yield paths, store, load_authority(paths)[0]
    store.close()


def image_identity(paths, store, connector, tmp_path) -> gate.Identity:
    doc = admin.issue_image(paths, connector, tmp_path / f"{connector}.json", [])
    cert = x509.load_pem_x509_certificate(
        json.loads((tmp_path / f"{connector}.json").read_text())["cert_pem"].encode())
    ident = gate.identify(store, cert)
    assert ident.role == "image" and ident.image_id == doc["image_id"]
    return ident


def request(fingerprint: str) -> dict:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
           .sign(key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM).decode()
    return {"csr_pem": csr, "machine": {"fingerprint": fingerprint, "platform": "vmware"},
            "sealing_public_key": sealing.public_key_text(sealing.generate_private_key())}


def test_enroll_issues_short_lived_instance_cert(home, tmp_path):
    paths, store, authority = home
    ident = image_identity(paths, store, "ova", tmp_path)
    body = enroll.enroll(store, authority, ident, request("uuid-1"))
    cert = x509.load_pem_x509_certificate(body["cert_pem"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        f"instance:{body['instance_id']}"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() <= (pki.INSTANCE_HOURS * 3600 + 600)
    assert body["renew_after"] < body["not_after"]
    instance = gate.identify(store, cert)
    assert instance.role == "instance" and instance.instance_id == body["instance_id"]
    assert store.instance(body["instance_id"])["machine"]["platform"] == "vmware"


def test_ova_clone_refused_and_recorded(home, tmp_path):
    paths, store, authority = home
    ident = image_identity(paths, store, "ova", tmp_path)
    first = enroll.enroll(store, authority, ident, request("uuid-1"))
    again = enroll.enroll(store, authority, ident, request("uuid-1"))
    assert again["instance_id"] == first["instance_id"]
    with pytest.raises(HomeError) as info:
        enroll.enroll(store, authority, ident, request("uuid-2"))
    assert info.value.code is ErrorCode.CLONE_REFUSED and info.value.extra["limit"] == 1
    with pytest.raises(HomeError):
        enroll.enroll(store, authority, ident, request("uuid-2"))
    (clone,) = store.clones()
    assert clone["machine_fingerprint"] == "uuid-2" and clone["attempts"] == 2
    assert store.count_instances(ident.image_id) == 1


def test_ami_allows_max_instances(home, tmp_path):
    paths, store, authority = home
    ident = image_identity(paths, store, "ami", tmp_path)
    enroll.enroll(store, authority, ident, request("i-0000000000000001"))
    enroll.enroll(store, authority, ident, request("i-0000000000000002"))
    with pytest.raises(HomeError) as info:
        enroll.enroll(store, authority, ident, request("i-0000000000000003"))
    assert info.value.code is ErrorCode.CLONE_REFUSED


@pytest.mark.parametrize("mutate, code", [
    (lambda b: b.update(csr_pem="nope"), ErrorCode.BAD_CSR),
    (lambda b: b.update(sealing_public_key="short"), ErrorCode.BAD_CSR),
    (lambda b: b.update(machine={"fingerprint": ""}), ErrorCode.BAD_TYPE),
    (lambda b: b.update(machine={"fingerprint": 5}), ErrorCode.BAD_TYPE),
    (lambda b: b.update(machine={}), ErrorCode.BAD_TYPE),
])
def test_enroll_bad_input(home, tmp_path, mutate, code):
    paths, store, authority = home
    ident = image_identity(paths, store, "ova", tmp_path)
    body = request("uuid-9")
    mutate(body)
    with pytest.raises(HomeError) as info:
        enroll.enroll(store, authority, ident, body)
    assert info.value.code is code
    assert store.count_instances(ident.image_id) == 0


def test_renew_needs_instance_and_enroll_needs_image(home, tmp_path):
    paths, store, authority = home
    ident = image_identity(paths, store, "ova", tmp_path)
    with pytest.raises(HomeError) as info:
        enroll.renew(store, authority, ident, request("x"))
    assert info.value.code is ErrorCode.UNAUTHORIZED
    body = enroll.enroll(store, authority, ident, request("uuid-1"))
    instance = gate.identify(store, x509.load_pem_x509_certificate(body["cert_pem"].encode()))
    with pytest.raises(HomeError) as info:
        enroll.enroll(store, authority, instance, request("uuid-1"))
    assert info.value.code is ErrorCode.UNAUTHORIZED
    renewed = enroll.renew(store, authority, instance, request("uuid-1"))
    assert renewed["instance_id"] == body["instance_id"]
    assert store.instance(body["instance_id"])["cert_serial"] == renewed["serial"]


def test_gate_refusals(home, tmp_path):
    paths, store, authority = home
    with pytest.raises(gate.Refusal) as info:
        gate.identify(store, None)
    assert info.value.status is http.HTTPStatus.UNAUTHORIZED
    ident = image_identity(paths, store, "ova", tmp_path)
    cert = store.cert(ident.serial)
    store.revoke_cert(ident.serial, "lost laptop")
    image_cert = x509.load_pem_x509_certificate(
        json.loads((tmp_path / "ova.json").read_text())["cert_pem"].encode())
    with pytest.raises(gate.Refusal) as info:
        gate.identify(store, image_cert)
    assert info.value.reason == "revoked" and "lost laptop" in info.value.text
    with pytest.raises(gate.Refusal) as info:
        gate.identify(store, image_cert, now=cert["not_after"] + 1)
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    with pytest.raises(gate.Refusal) as info:
        gate.identify(store, server)
    assert info.value.reason == "wrong_kind"


def test_server_names_and_csr_checks():
    sans = pki.server_names(["home.example.invalid", "10.0.0.1", "::1"])
    assert [type(s).__name__ for s in sans] == ["DNSName", "IPAddress", "IPAddress"]
    with pytest.raises(pki.PkiError):
        pki.server_names(["bad name"])
    with pytest.raises(pki.PkiError):
        pki.load_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                     "-----END CERTIFICATE REQUEST-----\n")


def test_image_max_instances_overrides_connector(home, tmp_path):
    paths, store, authority = home
    admin.issue_image(paths, "ova", tmp_path / "ami.json", [], max_instances=3)
    cert = x509.load_pem_x509_certificate(
        json.loads((tmp_path / "ami.json").read_text())["cert_pem"].encode())
    ident = gate.identify(store, cert)
    for n in range(3):
        enroll.enroll(store, authority, ident, request(f"i-{n:017d}"))
    with pytest.raises(HomeError) as info:
        enroll.enroll(store, authority, ident, request("i-99999999999999999"))
    assert info.value.extra["limit"] == 3


def test_old_database_is_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE images (image_id TEXT PRIMARY KEY, connector TEXT, fingerprint "
               "TEXT, cert_serial TEXT, home_urls TEXT, issued_at REAL)")
    db.commit()
    db.close()
    store = Store(path)
    columns = {row[1] for row in store.db.execute("PRAGMA table_info(images)")}
    store.close()
    assert "max_instances" in columns
