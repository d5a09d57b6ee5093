"""Secrets sealed to one appliance instance's public key.

Home encrypts a secret (a directory bind password, say) so that only the one
appliance instance holding the matching private key can read it; the sealed text
can then sit inside a signed configuration, in home's database or in the agent's
last-good configuration file on disk without revealing anything.

Key decision (see also docs/CONTRACTS.md): every instance owns two keys, both
generated at first boot and never leaving the machine:

* an **X25519** key for sealing (this module) — its public half travels to home
  at enrollment as ``sealing_public_key`` (:func:`public_key_text`);
* an **EC P-256** key for signing: the CSR and the TLS client certificate
  (``tether.agent.instancekeys``).

X25519 cannot sign and ECDSA keys are a poor fit for ECIES-style sealing, so one
key per purpose keeps each use standard and auditable.

Scheme (version 1), an ECIES/HPKE-base-mode construction:

1. a fresh ephemeral X25519 key pair per message;
2. ``shared = X25519(ephemeral_private, recipient_public)``;
3. ``key = HKDF-SHA256(shared, salt=ephemeral_public || recipient_public,
   info=b"tether-sealing v1")`` (32 bytes);
4. ``ChaCha20-Poly1305(key)`` with a random 12-byte nonce, the caller's
   associated data bound in.

Wire form: ``"tether-sealed:v1:" + base64url(ephemeral_public(32) || nonce(12)
|| ciphertext+tag)`` without padding — plain text, safe inside JSON.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "tether-sealed:"
VERSION = 1
_HEADER = f"{PREFIX}v{VERSION}:"
_HKDF_INFO = b"tether-sealing v1"
_KEY_LEN = 32
_NONCE_LEN = 12
_TAG_LEN = 16
_PUB_LEN = 32
#: Upper bound on one sealed secret; secrets are passwords and keys, not files.
MAX_PLAINTEXT = 64 * 1024


class SealingError(ValueError):
    """Base class: a secret could not be sealed or unsealed."""


class SealedFormatError(SealingError):
    """The sealed text is not a tether sealed secret of a version we know."""


class UnsealError(SealingError):
    """Authentication failed: the wrong instance key, or the text was altered."""


def generate_private_key() -> X25519PrivateKey:
    """A new instance sealing key (the agent does this once, at first boot)."""
    return X25519PrivateKey.generate()


def public_key_text(key: X25519PublicKey | X25519PrivateKey) -> str:
    """The public sealing key as base64url text, as sent to home at enrollment."""
    if isinstance(key, X25519PrivateKey):
        key = key.public_key()
    return _b64e(_raw_public(key))


def load_public_key(value: X25519PublicKey | str | bytes) -> X25519PublicKey:
    """Accept a key object, its raw 32 bytes, or the text of :func:`public_key_text`."""
    if isinstance(value, X25519PublicKey):
        return value
    raw = _b64d(value, what="public key") if isinstance(value, str) else bytes(value)
    if len(raw) != _PUB_LEN:
        raise SealingError(
            f"an X25519 public key is {_PUB_LEN} bytes, got {len(raw)}: pass the "
            "instance's sealing_public_key exactly as the agent reported it"
        )
    return X25519PublicKey.from_public_bytes(raw)


def private_key_pem(key: X25519PrivateKey) -> bytes:
    """PKCS#8 PEM (unencrypted; the file holding it is 0600 on the appliance)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(pem: bytes) -> X25519PrivateKey:
    """Read a key written by :func:`private_key_pem`; refuse any other key type."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, X25519PrivateKey):
        raise SealingError(
            f"expected an X25519 sealing key, found {type(key).__name__}: "
            "the instance sealing key file was replaced or is the wrong file"
        )
    return key


def seal(
    recipient_public_key: X25519PublicKey | str | bytes,
    plaintext: bytes,
    aad: bytes = b"",
) -> str:
    """Encrypt ``plaintext`` so that only the holder of the private key can read it.

    ``aad`` (optional) is bound to the ciphertext without being encrypted, e.g. the
    configuration field the secret belongs to, so a sealed value cannot be moved to
    another field unnoticed; pass the same bytes to :func:`unseal`.
    """
    if not isinstance(plaintext, (bytes, bytearray)):
        raise TypeError("seal() takes bytes; encode text first (e.g. .encode('utf-8'))")
    if len(plaintext) > MAX_PLAINTEXT:
        raise SealingError(f"secret of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT}")
    recipient = load_public_key(recipient_public_key)
    ephemeral = X25519PrivateKey.generate()
    eph_pub = _raw_public(ephemeral.public_key())
    key = _derive(ephemeral.exchange(recipient), eph_pub, _raw_public(recipient))
    nonce = os.urandom(_NONCE_LEN)
    body = ChaCha20Poly1305(key).encrypt(nonce, bytes(plaintext), aad)
    return _HEADER + _b64e(eph_pub + nonce + body)


def unseal(private_key: X25519PrivateKey, sealed: str, aad: bytes = b"") -> bytes:
    """Decrypt a sealed secret; :class:`UnsealError` on a wrong key or any tampering."""
    blob = _parse(sealed)
    eph_pub, nonce, body = (
        blob[:_PUB_LEN],
        blob[_PUB_LEN:_PUB_LEN + _NONCE_LEN],
        blob[_PUB_LEN + _NONCE_LEN:],
    )
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError as exc:  # all-zero shared secret from a crafted point
        raise UnsealError(f"sealed secret carries an invalid ephemeral key: {exc}") from exc
    key = _derive(shared, eph_pub, _raw_public(private_key.public_key()))
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, aad)
    except InvalidTag:
        raise UnsealError(
            "sealed secret does not open with this instance key: it was sealed to "
            "another instance (re-seal it to this instance's sealing_public_key) "
            "or was altered in transit"
        ) from None


def is_sealed(value: object) -> bool:
    """True for text that looks like a sealed secret (any version)."""
    return isinstance(value, str) and value.startswith(PREFIX)


def _parse(sealed: str) -> bytes:
    """Check the header and length; return the decoded binary body."""
    if not isinstance(sealed, str):
        raise SealedFormatError(f"sealed secret must be text, got {type(sealed).__name__}")
    if not sealed.startswith(PREFIX):
        raise SealedFormatError(
            f"not a sealed secret (expected text starting with {_HEADER!r})"
        )
    if not sealed.startswith(_HEADER):
        version = sealed[len(PREFIX):].split(":", 1)[0]
        raise SealedFormatError(
            f"sealed secret version {version!r} is not supported by this agent "
            f"(knows v{VERSION}); update the agent or re-seal with v{VERSION}"
        )
    blob = _b64d(sealed[len(_HEADER):], what="sealed secret")
    if len(blob) < _PUB_LEN + _NONCE_LEN + _TAG_LEN:
        raise SealedFormatError(f"sealed secret is truncated ({len(blob)} bytes)")
    return blob


def _derive(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    """HKDF-SHA256 over the X25519 output, salted with both public keys."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=_KEY_LEN,
        salt=eph_pub + recipient_pub,
        info=_HKDF_INFO,
    ).derive(shared)


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SealedFormatError(f"{what} is not valid base64url: {exc}") from None
