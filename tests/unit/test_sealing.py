"""tether.sealing: secrets sealed to an instance's X25519 key."""

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether import sealing


@pytest.fixture(scope="module")
def key():
    return sealing.generate_private_key()


def test_round_trip_with_key_object_text_and_raw(key):
    for pub in (key.public_key(), sealing.public_key_text(key),
                base64.urlsafe_b64decode(sealing.public_key_text(key) + "=")):
        sealed = sealing.seal(pub, b"bind-password")
        assert sealing.is_sealed(sealed)
        assert sealed.startswith("tether-sealed:v1:")
        assert sealing.unseal(key, sealed) == b"bind-password"


def test_each_seal_differs(key):
    a = sealing.seal(key.public_key(), b"same")
    b = sealing.seal(key.public_key(), b"same")
    assert a != b


def test_plaintext_not_visible(key):
    sealed = sealing.seal(key.public_key(), b"SuperSecretPassword")
    assert "SuperSecret" not in sealed
    assert b"SuperSecret" not in base64.urlsafe_b64decode(sealed.split(":")[-1] + "==")


def test_wrong_key_raises_unseal_error(key):
    other = sealing.generate_private_key()
    sealed = sealing.seal(other.public_key(), b"x")
    with pytest.raises(sealing.UnsealError, match="another instance"):
        sealing.unseal(key, sealed)


def test_aad_is_bound(key):
    sealed = sealing.seal(key.public_key(), b"x", aad=b"directories.0.bind_password")
    assert sealing.unseal(key, sealed, aad=b"directories.0.bind_password") == b"x"
    with pytest.raises(sealing.UnsealError):
        sealing.unseal(key, sealed, aad=b"directories.1.bind_password")


@pytest.mark.parametrize("position", [0, 20, 40, 50, -1])
def test_any_flipped_byte_is_detected(key, position):
    sealed = sealing.seal(key.public_key(), b"payload-of-some-length")
    head, body = sealed.rsplit(":", 1)
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[position] ^= 0x01
    tampered = head + ":" + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(sealing.UnsealError):
        sealing.unseal(key, tampered)


@pytest.mark.parametrize("text,message", [
    ("hello", "not a sealed secret"),
    ("tether-sealed:v9:AAAA", "version 'v9' is not supported"),
    ("tether-sealed:v1:AAAA", "truncated"),
    ("tether-sealed:v1:!!!*", "base64"),
])
def test_malformed_text_gets_format_error(key, text, message):
    with pytest.raises(sealing.SealedFormatError, match=message):
        sealing.unseal(key, text)


def test_non_text_rejected(key):
    with pytest.raises(sealing.SealedFormatError):
        sealing.unseal(key, b"tether-sealed:v1:")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sealing.seal(key.public_key(), "text")  # type: ignore[arg-type]


def test_bad_public_key_length():
    with pytest.raises(sealing.SealingError, match="32 bytes"):
        sealing.seal(b"\x01" * 31, b"x")


def test_oversized_secret_refused(key):
    with pytest.raises(sealing.SealingError, match="exceeds"):
        sealing.seal(key.public_key(), b"x" * (sealing.MAX_PLAINTEXT + 1))


def test_private_key_pem_round_trip(key):
    pem = sealing.private_key_pem(key)
    again = sealing.load_private_key_pem(pem)
    assert sealing.public_key_text(again) == sealing.public_key_text(key)


def test_pem_of_other_key_type_refused():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(sealing.SealingError, match="X25519"):
        sealing.load_private_key_pem(pem)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2048), st.binary(max_size=64))
def test_round_trip_property(key, data, aad):
    assert sealing.unseal(key, sealing.seal(key.public_key(), data, aad), aad) == data


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes_unseal(key, text):
    with pytest.raises(sealing.SealingError):
        sealing.unseal(key, "tether-sealed:v1:" + text)
