"""Update bundles: signed with home's update key, verified with real rauc like the appliance does."""

import shutil
import subprocess
import tarfile

import pytest

from tether.home import admin, paths, updatekeys
from tether.image import bundle

pytestmark = pytest.mark.skipif(not (shutil.which("rauc") and shutil.which("mksquashfs")),
                                reason="rauc and squashfs-tools are needed (deps/apt-packages.txt)")


def _home(tmp_path, name):
    state = paths.StatePaths(tmp_path / name)
    admin.init(state, [])
    return updatekeys.UpdateKeys.of(state)


@pytest.fixture
def root(tmp_path):
    top = tmp_path / "root"
    (top / "etc/tether").mkdir(parents=True)
    (top / "etc/tether/image.key").write_text("per-image secret\n")
    (top / "etc/os-release").write_text("ID=debian\n")
    (top / "usr/bin").mkdir(parents=True)
    (top / "usr/bin/tool").write_bytes(b"\x7fELF" + bytes(4096))
    return top


def _bundle(tmp_path, root, keys, version="1.0.0.20260101000000", compatible=bundle.COMPATIBLE):
    tar = tmp_path / "rootfs.tar"
    bundle.rootfs_tar(root, tar)
    out = tmp_path / f"b-{version}-{compatible}.raucb"
    return out, bundle.create(tar, out, version, keys.signing_cert, keys.signing_key, compatible)


def test_home_init_creates_a_code_signing_key_under_its_own_ca(tmp_path):
    keys = _home(tmp_path, "home")
    assert keys.exists()
    assert (keys.signing_key.stat().st_mode & 0o777) == 0o600 and (keys.ca_key.stat().st_mode & 0o777) == 0o600
    home_ca = (tmp_path / "home" / "ca.crt").read_bytes()
    assert keys.ca_cert.read_bytes() != home_ca, "the update CA is not home's TLS CA"


def test_existing_home_gets_the_update_key_on_first_use(tmp_path):
    state = paths.StatePaths(tmp_path / "old")
    admin.init(state, [])
    shutil.rmtree(tmp_path / "old" / "update")
    keys = updatekeys.ensure(state)
    assert keys.exists()
    assert updatekeys.ensure(state).ca_cert.read_bytes() == keys.ca_cert.read_bytes(), "created once"


def test_signed_bundle_verifies_and_holds_nothing_per_image(tmp_path, root):
    keys = _home(tmp_path, "home")
    out, made = _bundle(tmp_path, root, keys)
    got = bundle.verify(out, keys.ca_cert)
    assert (got.version, got.compatible, got.sha256) == ("1.0.0.20260101000000", bundle.COMPATIBLE, made.sha256)
    extracted = tmp_path / "x"
    subprocess.run(["unsquashfs", "-q", "-d", str(extracted), str(out)], check=True, capture_output=True)
    with tarfile.open(extracted / "rootfs.tar") as tar:
        names = tar.getnames()
    assert "./etc/os-release" in names and "./usr/bin/tool" in names
    assert not [n for n in names if n.startswith("./etc/tether/")], "the image key must never be in a bundle"


def test_bundle_signed_by_another_home_is_refused(tmp_path, root):
    ours, theirs = _home(tmp_path, "ours"), _home(tmp_path, "theirs")
    out, _ = _bundle(tmp_path, root, theirs)
    with pytest.raises(bundle.BundleError, match="refused"):
        bundle.verify(out, ours.ca_cert)


def test_bundle_for_another_product_is_refused(tmp_path, root):
    keys = _home(tmp_path, "home")
    out, _ = _bundle(tmp_path, root, keys, compatible="tether-appliance-arm64")
    with pytest.raises(bundle.BundleError):
        bundle.verify(out, keys.ca_cert)


def test_tampered_and_truncated_bundles_are_refused(tmp_path, root):
    keys = _home(tmp_path, "home")
    out, _ = _bundle(tmp_path, root, keys)
    data = bytearray(out.read_bytes())
    tampered = tmp_path / "tampered.raucb"
    data[100] ^= 0xFF
    tampered.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.raucb"
    truncated.write_bytes(out.read_bytes()[: len(data) // 2])
    for bad in (tampered, truncated):
        with pytest.raises(bundle.BundleError):
            bundle.verify(bad, keys.ca_cert)


def test_bundle_signed_with_the_tls_ca_key_is_refused(tmp_path, root):
    """The home's TLS CA must not be able to sign firmware: the keyring is the update CA only."""
    keys = _home(tmp_path, "home")
    state = tmp_path / "home"
    tar = tmp_path / "rootfs.tar"
    bundle.rootfs_tar(root, tar)
    out = tmp_path / "tls.raucb"
    bundle.create(tar, out, "1.0", state / "server.crt", state / "server.key")
    with pytest.raises(bundle.BundleError, match="refused"):
        bundle.verify(out, keys.ca_cert)


@pytest.mark.parametrize("version", ["", "1\n2", "a=b"])
def test_bad_versions_are_refused(version):
    with pytest.raises(bundle.BundleError, match="version"):
        bundle.manifest_text(version)


def test_image_version_is_agent_version_and_build_time():
    doc = {"agent_version": "0.1.0", "built_at": "2026-12-05T09:24:32+00:00"}
    assert bundle.image_version(doc) == "0.1.0.20261205092432"
    with pytest.raises(bundle.BundleError, match="built_at"):
        bundle.image_version({"agent_version": "0.1.0"})
