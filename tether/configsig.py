"""Signed, versioned configuration documents (home signs, the agent verifies).

Home holds one Ed25519 *config-signing key* (``tether-home init``). The agent
learns its public half as ``config_key_pem`` in the ``enroll`` and ``hello``
responses, i.e. over the mutually authenticated TLS channel whose only trust
anchor is home's pinned CA, and keeps it next to its instance certificate. A
configuration is only used after :func:`verify_config` accepted it,
so a man in the middle, a corrupted disk file or an edited last-good copy all
fail with a specific :class:`ConfigError` subclass.

Document shape (what travels in ``config.push`` and sits on the agent's disk)::

    {
      "format": "tether-config",
      "payload": {
        "version": 7,                  # int >= 1, grows with every change
        "connector": "acme-ad",        # which connector the config is for
        "issued_at": 1764100000.0,     # Unix time of signing
        "instance_id": "..." | null,   # set when secrets are sealed to one instance
        "config": {...}                # the configuration proper
      },
      "key_id": "sha256 hex (first 16) of the raw public key",
      "signature": "base64 of Ed25519(canonical_json(payload))"
    }

Canonical JSON: UTF-8, keys sorted, no spaces, no NaN/Infinity
(:func:`canonical_json`), so the same payload always yields the same bytes.

Secrets: any string field whose name is in :data:`SECRET_FIELDS` (e.g.
``bind_password``) is sealed to the instance's X25519 key before signing
(:func:`seal_secrets`, with the field's JSON path as associated data) and
opened in memory only (:func:`unseal_secrets`). Sealing is passed in as a
callable so this module does not depend on :mod:`tether.sealing`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

FORMAT = "tether-config"
#: Configuration field names whose string values are secrets (sealed per instance).
SECRET_FIELDS = frozenset({"bind_password", "password", "proxy_password", "secret",
                           "client_secret"})


class ConfigError(ValueError):
    """A configuration document was refused. ``code`` matches a protocol ErrorCode value."""

    code = "bad_config"


class ConfigFormatError(ConfigError):
    """Not a tether configuration document (wrong shape or field types)."""

    code = "bad_config"


class ConfigSignatureError(ConfigError):
    """The signature does not verify: the document was altered or signed by another key."""

    code = "bad_signature"


class ConfigVersionError(ConfigError):
    """The document is older than the configuration already in use (rollback attempt)."""

    code = "stale_config"


class ConfigTargetError(ConfigError):
    """The document is for another connector or another instance."""

    code = "bad_config"


@dataclass(frozen=True)
class SignedConfig:
    """A verified configuration: safe to use."""

    version: int
    connector: str
    issued_at: float
    instance_id: str | None
    config: dict
    key_id: str


def canonical_json(value: Any) -> bytes:
    """The exact bytes that are signed: sorted keys, compact, UTF-8, no NaN."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ConfigFormatError(f"configuration is not plain JSON data: {exc}") from None


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable name of a signing key (first 16 hex of SHA-256 of its raw bytes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_signing_key() -> Ed25519PrivateKey:
    """A new config-signing key (home does this once, at init)."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM for the key file (0600 in home's state directory)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of the verification key (what agents trust)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """Read the signing key; refuse other key types with a clear message."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"config-signing key must be Ed25519, found {type(key).__name__}")
    return key


def load_public_key(pem: bytes | str) -> Ed25519PublicKey:
    """Read the verification key (PEM); refuse other key types."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"config verification key is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"config verification key must be Ed25519, found {type(key).__name__}")
    return key


def sign_config(key: Ed25519PrivateKey, config: dict, *, version: int, connector: str,
                instance_id: str | None = None, issued_at: float | None = None) -> dict:
    """Wrap ``config`` in a signed document (see the module docstring)."""
    if not isinstance(config, dict):
        raise ConfigFormatError("a configuration is a JSON object")
    if not _is_int(version) or version < 1:
        raise ConfigFormatError("version must be an integer >= 1")
    payload = {
        "version": version,
        "connector": connector,
        "issued_at": time.time() if issued_at is None else float(issued_at),
        "instance_id": instance_id,
        "config": config,
    }
    signature = key.sign(canonical_json(payload))
    return {"format": FORMAT, "payload": payload, "key_id": key_id(key.public_key()),
            "signature": base64.b64encode(signature).decode("ascii")}


def verify_config(public_key: Ed25519PublicKey, document: Any, *,
                  connector: str | None = None, instance_id: str | None = None,
                  min_version: int | None = None) -> SignedConfig:
    """Check shape, signature, target and version; return the usable configuration.

    ``min_version`` is the version already in use: an older document is a
    rollback and is refused (:class:`ConfigVersionError`); the same version is
    accepted (a re-push after reconnect).
    """
    payload, signature = _split(document)
    try:
        public_key.verify(signature, canonical_json(payload))
    except InvalidSignature:
        raise ConfigSignatureError(
            "configuration signature does not verify: the document was altered after "
            "signing or signed by another home; discard it and keep the last good one"
        ) from None
    result = _payload_to_config(payload, key_id(public_key))
    if connector is not None and result.connector != connector:
        raise ConfigTargetError(f"configuration is for connector {result.connector!r}, "
                                f"this agent belongs to {connector!r}")
    if instance_id is not None and result.instance_id not in (None, instance_id):
        raise ConfigTargetError(f"configuration was sealed for instance {result.instance_id!r}, "
                                f"not this one ({instance_id!r})")
    if min_version is not None and result.version < min_version:
        raise ConfigVersionError(f"configuration version {result.version} is older than the "
                                 f"version in use ({min_version}); refusing a rollback")
    return result


def _split(document: Any) -> tuple[dict, bytes]:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConfigFormatError(f"not a {FORMAT} document (need format={FORMAT!r})")
    payload, sig = document.get("payload"), document.get("signature")
    if not isinstance(payload, dict) or not isinstance(sig, str):
        raise ConfigFormatError("document needs a payload object and a signature string")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigSignatureError("signature is not valid base64") from None
    if len(signature) != 64:
        raise ConfigSignatureError(f"an Ed25519 signature is 64 bytes, got {len(signature)}")
    return payload, signature


def _payload_to_config(payload: dict, kid: str) -> SignedConfig:
    version, issued = payload.get("version"), payload.get("issued_at")
    if not _is_int(version) or version < 1:
        raise ConfigFormatError("payload.version must be an integer >= 1")
    if not isinstance(payload.get("connector"), str):
        raise ConfigFormatError("payload.connector must be a string")
    if isinstance(issued, bool) or not isinstance(issued, (int, float)) \
            or not math.isfinite(issued):
        raise ConfigFormatError("payload.issued_at must be a number")
    if payload.get("instance_id") is not None and not isinstance(payload["instance_id"], str):
        raise ConfigFormatError("payload.instance_id must be a string or null")
    if not isinstance(payload.get("config"), dict):
        raise ConfigFormatError("payload.config must be an object")
    return SignedConfig(version=version, connector=payload["connector"],
                        issued_at=float(issued), instance_id=payload.get("instance_id"),
                        config=payload["config"], key_id=kid)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- secrets inside


def seal_secrets(config: Any, seal: Callable[[bytes, bytes], str], path: str = "") -> Any:
    """Copy of ``config`` with every secret field's string sealed.

    ``seal(plaintext, aad)`` is e.g. ``lambda p, a: sealing.seal(instance_key, p, a)``;
    the aad is the field's JSON path (``directories/0/bind_password``) so a sealed
    value cannot be moved to another field.
    """
    return _map_secret_fields(
        config, lambda value: isinstance(value, str) and not _looks_sealed(value),
        lambda value, aad: seal(value.encode("utf-8"), aad), path)


def unseal_secrets(config: Any, unseal: Callable[[str, bytes], bytes], path: str = "") -> Any:
    """Inverse of :func:`seal_secrets`: open every sealed secret field (in memory only)."""
    return _map_secret_fields(config, _looks_sealed,
                              lambda value, aad: unseal(value, aad).decode("utf-8"), path)


def _map_secret_fields(config: Any, applies: Callable[[Any], bool],
                       change: Callable[[Any, bytes], Any], path: str) -> Any:
    """Copy of ``config`` with ``change(value, json_path)`` applied to each secret field
    whose value ``applies``; one walk for sealing and unsealing so both always visit the
    same fields with the same aad."""
    if isinstance(config, dict):
        out = {}
        for name, value in config.items():
            sub = f"{path}/{name}" if path else str(name)
            if name in SECRET_FIELDS and applies(value):
                out[name] = change(value, sub.encode("utf-8"))
            else:
                out[name] = _map_secret_fields(value, applies, change, sub)
        return out
    if isinstance(config, list):
        return [_map_secret_fields(v, applies, change, f"{path}/{i}" if path else str(i))
                for i, v in enumerate(config)]
    return config


def _looks_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("tether-sealed:")
