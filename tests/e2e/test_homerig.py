"""The boot test's home rig: state copy, server certificate for the guest address (no VM)."""

from __future__ import annotations

import ipaddress
import json
import subprocess

import pytest
from cryptography import x509
from homeproc import TETHER_HOME
from homerig import RigError, copy_state, reissue_server_cert, start_home
import vm


@pytest.fixture
def image_state(tmp_path):
    """A home state as the image build leaves it: init, connector, one image issued."""
    state = tmp_path / "state"
    for args in (["init"], ["connector", "create", "default"],
                 ["image", "issue", "--connector", "default", "--out", str(tmp_path / "b.json")]):
        subprocess.run([TETHER_HOME, *args, "--state", str(state)], check=True,
                       capture_output=True)
    return state, json.loads((tmp_path / "b.json").read_text())["image_id"]


def _sans(cert_file) -> x509.SubjectAlternativeName:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_copy_gets_a_cert_for_the_guest_address_and_the_original_is_untouched(image_state, tmp_path):
    state, _ = image_state
    before = (state / "server.crt").read_bytes()
    copy = copy_state(state, tmp_path / "copy")
    reissue_server_cert(copy, [vm.GUEST_HOME_ADDRESS, "home.tether.invalid"])
    sans = _sans(copy / "server.crt")
    assert ipaddress.ip_address(vm.GUEST_HOME_ADDRESS) in sans.get_values_for_type(x509.IPAddress)
    assert "home.tether.invalid" in sans.get_values_for_type(x509.DNSName)
    assert (state / "server.crt").read_bytes() == before


def test_not_a_state_directory(tmp_path):
    with pytest.raises(RigError, match="--home-state"):
        copy_state(tmp_path, tmp_path / "copy")


def test_home_serves_the_image_and_refuses_an_unknown_one(image_state, tmp_path):
    state, image_id = image_state
    home = start_home(state, tmp_path / "a", image_id, vm.GUEST_HOME_ADDRESS)
    try:
        assert home.connector == "default" and home.port > 0
        assert home.events("listening")
    finally:
        home.stop()
    with pytest.raises(RigError, match="does not know image"):
        start_home(state, tmp_path / "b", "00000000-0000-0000-0000-000000000000",
                   vm.GUEST_HOME_ADDRESS)
