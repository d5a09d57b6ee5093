"""RAUC's post-install handler (ansible role update) finds the version of the bundle being installed.

The agent reports the slot's image-version file as the version it runs; a
wrong one would make home offer the same update again, so the handler
refuses to finish an install whose version it cannot tell.
"""

import importlib.util
from pathlib import Path

import pytest

HANDLER = Path(__file__).resolve().parents[2] / "ansible/roles/update/files/rauc_post_install.py"


@pytest.fixture
def handler():
    spec = importlib.util.spec_from_file_location("rauc_post_install", HANDLER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("RAUC_MF_VERSION", "RAUC_BUNDLE_MOUNT_POINT", "RAUC_UPDATE_SOURCE"):
        monkeypatch.delenv(var, raising=False)


def test_version_from_the_mounted_bundles_manifest(handler, tmp_path, monkeypatch):
    (tmp_path / "manifest.raucm").write_text(
        "[update]\ncompatible=tether-appliance-amd64\nversion=0.1.0.20261205123314.1\n\n"
        "[image.rootfs]\nfilename=rootfs.tar\nversion=9\n")
    monkeypatch.setenv("RAUC_BUNDLE_MOUNT_POINT", str(tmp_path))
    assert handler.bundle_version() == "0.1.0.20261205123314.1"


def test_the_manifest_field_rauc_exports_wins(handler, monkeypatch):
    monkeypatch.setenv("RAUC_MF_VERSION", "1.2.3")
    assert handler.bundle_version() == "1.2.3"


def test_unknown_version_fails_the_install(handler, tmp_path, monkeypatch):
    monkeypatch.setenv("RAUC_BUNDLE_MOUNT_POINT", str(tmp_path))
    with pytest.raises(SystemExit, match="version is unknown"):
        handler.bundle_version()
