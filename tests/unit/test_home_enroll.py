"""Enrollment policy, identity gate and PKI of home, on a temporary state dir (no sockets)."""

from __future__ import annotations

import http
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether import enrolproof, sealing
from tether.home import admin, enroll, gate, pki
from tether.home.errors import HomeError
from tether.home.store import StoreError
from tether.home.paths import StatePaths
from tether.home.server import load_authority
from tether.home.ratelimit import RateLimit
from tether.home.store import OTHER_MACHINES, Store
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


def request(fingerprint: str, key=None, *, proof_key=None, image_id: str = "",
            now: float | None = None) -> dict:
    """An enroll body for ``key`` (new by default); ``proof_key`` signs a proof."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
           .sign(key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM).decode()
    body = {"csr_pem": csr, "machine": {"fingerprint": fingerprint, "platform": "vmware"},
            "sealing_public_key": sealing.public_key_text(sealing.generate_private_key())}
    if proof_key is not None:
        body["proof"] = enrolproof.sign(proof_key, image_id=image_id, fingerprint=fingerprint,
                                        csr_pem=csr, sealing_public_key=body["sealing_public_key"],
                                        now=now)
    return body


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
    key = ec.generate_private_key(ec.SECP256R1())
    first = enroll.enroll(store, authority, ident, request("uuid-1", key))
    again = enroll.enroll(store, authority, ident,
                          request("uuid-1", key, proof_key=key, image_id=ident.image_id))
    assert again["instance_id"] == first["instance_id"]  # the instance itself, with its key
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
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE instances (instance_id TEXT PRIMARY KEY, image_id TEXT, "
               "machine_fingerprint TEXT)")
    db.execute("CREATE TABLE clones (image_id TEXT, machine_fingerprint TEXT)")
    db.commit()
    db.close()
    store = Store(path)
    columns = {row[1] for row in store.db.execute("PRAGMA table_info(images)")}
    instances = {row[1] for row in store.db.execute("PRAGMA table_info(instances)")}
    clones = {row[1] for row in store.db.execute("PRAGMA table_info(clones)")}
    store.close()
    assert "max_instances" in columns
    assert {"key_spki", "reset_at"} <= instances and {"reason", "instance_id"} <= clones


# ------------------------------------------ issue 11: enrolment that proves possession


def _enrolled(home, tmp_path, connector="ova"):
    paths, store, authority = home
    ident = image_identity(paths, store, connector, tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    body = request("uuid-1", key)
    first = enroll.enroll(store, authority, ident, body)
    return ident, key, first, store.instance(first["instance_id"])


@pytest.mark.parametrize("attempt", ["no proof", "proof by the new key", "stale proof",
                                     "proof for another request", "garbage proof"])
def test_image_credential_alone_cannot_rekey_an_enrolled_machine(home, tmp_path, attempt):
    paths, store, authority = home
    ident, key, first, before = _enrolled(home, tmp_path)
    attacker = ec.generate_private_key(ec.SECP256R1())
    if attempt == "no proof":
        body = request("uuid-1", attacker)
    elif attempt == "proof by the new key":
        body = request("uuid-1", attacker, proof_key=attacker, image_id=ident.image_id)
    elif attempt == "stale proof":  # even the instance's own key, 10 minutes old
        import time
        body = request("uuid-1", key, proof_key=key, image_id=ident.image_id,
                       now=time.time() - 600)
    elif attempt == "proof for another request":  # a captured proof, new sealing key
        body = request("uuid-1", key, proof_key=key, image_id=ident.image_id)
        body["sealing_public_key"] = sealing.public_key_text(sealing.generate_private_key())
    else:
        body = request("uuid-1", attacker)
        body["proof"] = {"ts": "now", "signature": "!!"}
    with pytest.raises(HomeError) as info:
        enroll.enroll(store, authority, ident, body)
    assert info.value.code is ErrorCode.CLONE_REFUSED
    assert f"tether-home instance reset {first['instance_id']}" in info.value.detail
    after = store.instance(first["instance_id"])
    for field in ("sealing_public_key", "key_spki", "cert_serial", "enrolled_at"):
        assert after[field] == before[field]
    assert [c["serial"] for c in store.valid_instance_certs(first["instance_id"])] == \
        [first["serial"]]
    (clone,) = store.clones()
    assert clone["reason"] == "machine_enrolled"
    assert clone["instance_id"] == first["instance_id"]


def test_proven_reenrolment_rekeys_and_revokes_the_old_certificate(home, tmp_path):
    paths, store, authority = home
    ident, key, first, before = _enrolled(home, tmp_path)
    new_key = ec.generate_private_key(ec.SECP256R1())  # the instance moves to a new key
    body = request("uuid-1", new_key, proof_key=key, image_id=ident.image_id)
    again = enroll.enroll(store, authority, ident, body)
    assert again["instance_id"] == first["instance_id"]
    row = store.instance(first["instance_id"])
    assert row["sealing_public_key"] == body["sealing_public_key"]
    assert row["key_spki"] == enrolproof.public_key_pem(new_key.public_key())
    assert [c["serial"] for c in store.valid_instance_certs(first["instance_id"])] == \
        [again["serial"]]
    assert store.cert(first["serial"])["revoke_reason"] == f"replaced by {again['serial']}"
    # the old key may no longer speak for the instance
    with pytest.raises(HomeError):
        enroll.enroll(store, authority, ident,
                      request("uuid-1", key, proof_key=key, image_id=ident.image_id))


def test_instance_reset_lets_the_machine_enroll_afresh(home, tmp_path):
    paths, store, authority = home
    ident, key, first, _ = _enrolled(home, tmp_path)
    doc = admin.reset_instance(paths, first["instance_id"])
    assert doc["revoked"] == [first["serial"]] and doc["machine"] == "uuid-1"
    assert store.valid_instance_certs(first["instance_id"]) == []
    fresh = ec.generate_private_key(ec.SECP256R1())  # the state was lost: new keys, no proof
    again = enroll.enroll(store, authority, ident, request("uuid-1", fresh))
    assert again["instance_id"] == first["instance_id"]
    row = store.instance(first["instance_id"])
    assert row["reset_at"] is None and row["key_spki"] == \
        enrolproof.public_key_pem(fresh.public_key())
    with pytest.raises(HomeError):  # one fresh enrolment per reset
        enroll.enroll(store, authority, ident, request("uuid-1"))
    with pytest.raises(StoreError):
        admin.reset_instance(paths, "no-such-instance")


def test_renewal_keeps_at_most_two_valid_certificates(home, tmp_path):
    paths, store, authority = home
    ident, key, first, _ = _enrolled(home, tmp_path)
    current = gate.identify(store, x509.load_pem_x509_certificate(first["cert_pem"].encode()))
    for _ in range(5):
        renewed = enroll.renew(store, authority, current, request("uuid-1", key))
        valid = {c["serial"] for c in store.valid_instance_certs(first["instance_id"])}
        assert valid == {current.serial, renewed["serial"]}  # the one in use, the next
        current = gate.identify(store, x509.load_pem_x509_certificate(
            renewed["cert_pem"].encode()))
    assert store.cert(first["serial"])["revoked_at"] is not None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limits_refuse_with_busy_and_clone_rows_are_capped(home, tmp_path):
    paths, store, authority = home
    ident, key, first, _ = _enrolled(home, tmp_path)
    clock = Clock()
    limits = enroll.Limits(refusals=RateLimit(1.0, 5, clock=clock),
                           rekeys=RateLimit(1 / 60, 2, clock=clock),
                           clones=RateLimit(1.0, 3, clock=clock), max_clone_rows=4)
    codes = []
    for n in range(8):
        try:
            enroll.enroll(store, authority, ident, request(f"uuid-x{n}"), limits)
        except enroll.RateLimited as exc:
            codes.append(exc.code.value)
        except HomeError as exc:
            codes.append(exc.code.value)
    assert codes == ["clone_refused"] * 3 + ["busy"] * 5
    assert store.count_clones(ident.image_id) == 3
    for n in range(20):  # slowly, within the rate: rows stop at the cap + one aggregate row
        clock.now += 10
        with pytest.raises(HomeError):
            enroll.enroll(store, authority, ident, request(f"uuid-y{n}"), limits)
    assert store.count_clones(ident.image_id) == 5
    other = [c for c in store.clones() if c["machine_fingerprint"] == OTHER_MACHINES]
    assert other and other[0]["attempts"] == 19
    # renewals count per instance
    instance = gate.identify(store, x509.load_pem_x509_certificate(first["cert_pem"].encode()))
    enroll.renew(store, authority, instance, request("uuid-1", key), limits)
    enroll.renew(store, authority, instance, request("uuid-1", key), limits)
    with pytest.raises(enroll.RateLimited) as info:
        enroll.renew(store, authority, instance, request("uuid-1", key), limits)
    assert info.value.code is ErrorCode.BUSY and info.value.extra["retry_after"] > 0


def test_machine_facts_are_bounded(home, tmp_path):
    paths, store, authority = home
    ident = image_identity(paths, store, "ova", tmp_path)
    body = request("uuid-1")
    body["machine"].update(platform="p" * 100_000, junk="j" * 100_000)
    done = enroll.enroll(store, authority, ident, body)
    machine = store.instance(done["instance_id"])["machine"]
    assert set(machine) == {"fingerprint", "platform"} and len(machine["platform"]) == 256


def test_instance_of_an_older_home_adopts_its_key_at_connection(home, tmp_path):
    paths, store, authority = home
    ident, key, first, _ = _enrolled(home, tmp_path)
    store.db.execute("UPDATE instances SET key_spki = NULL")  # as migrated from before
    with pytest.raises(HomeError):  # no key on record: only the operator's reset
        enroll.enroll(store, authority, ident,
                      request("uuid-1", key, proof_key=key, image_id=ident.image_id))
    gate.identify(store, x509.load_pem_x509_certificate(first["cert_pem"].encode()))
    assert store.instance(first["instance_id"])["key_spki"] == \
        enrolproof.public_key_pem(key.public_key())
    again = enroll.enroll(store, authority, ident,
                          request("uuid-1", key, proof_key=key, image_id=ident.image_id))
    assert again["instance_id"] == first["instance_id"]
