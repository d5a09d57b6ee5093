"""Checking the image credential bundle before building with it."""

import json

import pytest

from tether.image import credential
from tether.image.errors import BuildError


def _bundle(**changes):
    b = {"format": "tether-image-credential", "version": 1, "image_id": "u-1", "connector": "default",
         "home_urls": ["wss://home.example:443/"], "key_pem": "-----BEGIN PRIVATE KEY-----\n...",
         "cert_pem": "-----BEGIN CERTIFICATE-----\n...", "ca_pem": "-----BEGIN CERTIFICATE-----\n...",
         "fingerprint": "ab" * 32, "cert_serial": "01"}
    b.update(changes)
    return b


def test_good_bundle_loads(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_bundle()))
    assert credential.load(path)["image_id"] == "u-1"


def test_every_problem_is_listed():
    with pytest.raises(BuildError) as err:
        credential.validate(_bundle(format="x", fingerprint="", home_urls=["http://plain"], key_pem="junk"), "c.json")
    text = str(err.value)
    for words in ("format is 'x'", "'fingerprint' missing", "wss://", "key_pem is not a PEM", "tether-home image issue"):
        assert words in text


def test_unreadable_files_are_clear(tmp_path):
    with pytest.raises(BuildError, match="not found"):
        credential.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(BuildError, match="not readable JSON"):
        credential.load(tmp_path / "bad.json")


def test_placed_copy_is_private(tmp_path):
    src = tmp_path / "c.json"
    src.write_text(json.dumps(_bundle()))
    (tmp_path / "work").mkdir()
    dest = credential.place(src, tmp_path / "work")
    assert dest.stat().st_mode & 0o777 == 0o600


def test_home_state_is_created_once_and_every_build_gets_a_new_key(tmp_path):
    """Through the real tether-home CLI: two builds, two different image keys."""
    state = tmp_path / "home"
    credential.ensure_home(state, say=lambda _: None)
    ca_before = (state / "ca.crt").read_bytes()
    credential.ensure_home(state, say=lambda _: None)  # second call: nothing to do
    assert (state / "ca.crt").read_bytes() == ca_before
    one = credential.issue(state, tmp_path / "one.json", ["wss://home.example:8443/"])
    two = credential.issue(state, tmp_path / "two.json", [])
    assert one["fingerprint"] != two["fingerprint"] and one["image_id"] != two["image_id"]
    assert one["ca_pem"] == two["ca_pem"] == ca_before.decode()
    assert one["home_urls"] == ["wss://home.example:8443/"]
    assert (tmp_path / "one.json").stat().st_mode & 0o777 == 0o600
