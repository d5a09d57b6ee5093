"""manifest.json and SHA256SUMS from a fake mounted root and a real credential bundle."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether.image import manifest
from tether.image.errors import BuildError

DPKG_STATUS = """\
Package: base-files
Status: install ok installed
Priority: required
Architecture: amd64
Version: 12.4+deb12u7
Description: Debian base system miscellaneous files
 This package contains the basic filesystem hierarchy.

Package: openssh-server
Status: deinstall ok config-files
Architecture: amd64
Version: 1:9.2p1-2+deb12u3

Package: linux-image-6.1.0-25-cloud-amd64
Status: install ok installed
Architecture: amd64
Version: 6.1.106-3
Depends: kmod, linux-base (>= 4.3~)

Package: nftables
Status: install ok installed
Architecture: amd64
Version: 1.0.6-2+deb12u2
"""


def _bundle(serial: int = 0x1F2E3D) -> dict:
    """A credential bundle shaped as CONTRACTS.md describes, with a real CA-signed cert."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "image")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "home CA")]))
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now).not_valid_after(now + timedelta(days=30))
            .sign(ca_key, hashes.SHA256()))
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return {
        "format": "tether-image-credential", "version": 1,
        "image_id": "0b4c2a57-6a43-4d1e-9a0e-2f7c1d7f9a11", "connector": "corp",
        "home_urls": ["wss://home.tether.invalid:443/"],
        "key_pem": key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode(),
        "cert_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "ca_pem": "", "fingerprint": hashlib.sha256(spki).hexdigest(),
        "cert_serial": f"{serial:x}",
    }


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "root"
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(DPKG_STATUS)
    (root / "etc").mkdir()
    (root / "etc/debian_version").write_text("12.7\n")
    (root / "etc/os-release").write_text(
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n')
    for kernel in ("6.1.0-25-cloud-amd64", "6.1.0-9-cloud-amd64"):
        (root / "lib/modules" / kernel).mkdir(parents=True)
    dist = root / "opt/tether/venv/lib/python3.11/site-packages/tether_agent-0.3.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tether\nVersion: 0.3.1\n")
    return root


@pytest.fixture
def image_dir(tmp_path) -> Path:
    out = tmp_path / "images" / "img1"
    out.mkdir(parents=True)
    (out / "img1.ova").write_bytes(b"ova bytes" * 1000)
    with open(out / "img1.raw", "wb") as raw:
        raw.truncate(4 * 1024 * 1024)
        raw.write(b"boot")
    return out


def _built(image_dir: Path, root: Path, bundle: dict) -> dict:
    return manifest.build_manifest(
        "img1", bundle, root, image_dir / "img1.ova", image_dir / "img1.raw",
        built_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))


def test_manifest_fields(image_dir, root):
    bundle = _bundle()
    data = _built(image_dir, root, bundle)
    assert data["name"] == "img1"
    assert data["built_at"] == "2026-01-02T03:04:05+00:00"
    assert data["image_id"] == bundle["image_id"]
    assert data["key_fingerprint"] == bundle["fingerprint"]
    assert data["cert_serial"] == "1f2e3d"
    assert data["debian"] == {"version": "12.7", "pretty_name": "Debian GNU/Linux 12 (bookworm)",
                              "version_codename": "bookworm"}
    assert data["kernel"] == "6.1.0-25-cloud-amd64"
    assert data["kernels"] == ["6.1.0-9-cloud-amd64", "6.1.0-25-cloud-amd64"]
    assert data["agent_version"] == "0.3.1"
    assert data["packages"] == [
        {"name": "base-files", "version": "12.4+deb12u7", "architecture": "amd64"},
        {"name": "linux-image-6.1.0-25-cloud-amd64", "version": "6.1.106-3",
         "architecture": "amd64"},
        {"name": "nftables", "version": "1.0.6-2+deb12u2", "architecture": "amd64"},
    ]
    raw = data["artifacts"]["img1.raw"]
    assert raw["size"] == 4 * 1024 * 1024 and raw["allocated"] < raw["size"]
    assert raw["sha256"] == hashlib.sha256((image_dir / "img1.raw").read_bytes()).hexdigest()
    assert data["artifacts"]["img1.ova"]["sha256"] == hashlib.sha256(
        b"ova bytes" * 1000).hexdigest()


def test_fingerprint_of_key_and_cert_agree():
    bundle = _bundle()
    assert manifest.key_fingerprint(bundle["key_pem"]) == bundle["fingerprint"]
    assert manifest.key_fingerprint(bundle["cert_pem"]) == bundle["fingerprint"]


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
def test_files_written_and_sha256sum_checks_them(image_dir, root):
    data = _built(image_dir, root, _bundle())
    manifest.write_manifest(image_dir, data)
    sums = manifest.write_sha256sums(image_dir, data)
    assert json.loads((image_dir / "manifest.json").read_text()) == data
    assert manifest.read_manifest(image_dir) == data
    names = [line.split("  ")[1] for line in sums.read_text().splitlines()]
    assert names == ["img1.ova", "img1.raw", "manifest.json"]
    subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=image_dir, check=True)
    assert sorted(p.name for p in image_dir.iterdir()) == [
        "SHA256SUMS", "img1.ova", "img1.raw", "manifest.json"]
    (image_dir / "img1.ova").write_bytes(b"tampered")
    failed = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=image_dir,
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "img1.ova: FAILED" in failed.stdout


def test_bundle_that_lies_about_its_key_is_refused(image_dir, root):
    bundle = _bundle()
    bundle["fingerprint"] = "00" * 32
    with pytest.raises(BuildError, match="fingerprint does not match"):
        _built(image_dir, root, bundle)
    bundle = _bundle()
    bundle["cert_pem"] = _bundle()["cert_pem"]
    with pytest.raises(BuildError, match="certificate is not for the bundle's key"):
        _built(image_dir, root, bundle)
    with pytest.raises(BuildError, match="tether-home image issue"):
        _built(image_dir, root, {"format": "something"})


def test_missing_inputs_say_what_to_do(image_dir, root, tmp_path):
    with pytest.raises(BuildError, match="mounted root"):
        manifest.installed_packages(tmp_path / "empty")
    (image_dir / "img1.ova").unlink()
    with pytest.raises(BuildError, match="rerun make image"):
        _built(image_dir, root, _bundle())
    with pytest.raises(BuildError, match="make image"):
        manifest.read_manifest(tmp_path)


def test_known_digests_are_reused(image_dir, root):
    data = manifest.build_manifest("img1", _bundle(), root, image_dir / "img1.ova",
                                   image_dir / "img1.raw", known_sha256={"img1.ova": "ab" * 32})
    assert data["artifacts"]["img1.ova"]["sha256"] == "ab" * 32
    assert data["artifacts"]["img1.raw"]["sha256"] == hashlib.sha256(
        (image_dir / "img1.raw").read_bytes()).hexdigest()
