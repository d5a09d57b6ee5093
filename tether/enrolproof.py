"""Proof that an enrolment comes from the enrolled instance itself.

Why it exists: every copy of an image carries the same image credential, so the
image certificate says only "some copy of this image". A machine that is
enrolled already may be re-keyed (a new instance certificate, maybe a new key
or sealing key) only by the holder of its *current* instance key, or after the
operator's ``tether-home instance reset``. The agent therefore signs, with the
instance key home knows, a statement naming what it asks for: the image, the
machine fingerprint, the public key of the new CSR, the new sealing key and the
time. Home checks it against the key it recorded for the instance.

Binding the CSR's key and the sealing key makes a replayed proof useless (home
would issue a certificate only the proof's author can use and seal secrets only
to its sealing key); the time bounds how long a proof is worth anything, so no
nonce memory is needed on home. The proof travels as the ``proof`` field of the
``enroll`` body (:mod:`tether.protocol`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

PURPOSE = "tether.enroll-proof.v1"
#: A proof older or newer than this (home's clock) is refused, as stale messages are.
WINDOW_SECONDS = 300.0
MAX_SIGNATURE_CHARS = 1024


class ProofError(ValueError):
    """The proof is missing, malformed, stale or not signed by the instance's key."""


def public_key_pem(public_key) -> str:
    """PEM SubjectPublicKeyInfo: how home records an instance's current key."""
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def key_sha256(public_key) -> str:
    """sha256 hex of the DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _statement(*, image_id: str, fingerprint: str, csr_key_sha256: str,
               sealing_public_key: str, ts: float) -> bytes:
    return json.dumps({"purpose": PURPOSE, "image_id": image_id, "fingerprint": fingerprint,
                       "csr_key_sha256": csr_key_sha256,
                       "sealing_public_key": sealing_public_key, "ts": ts},
                      sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign(key, *, image_id: str, fingerprint: str, csr_pem: str, sealing_public_key: str,
         now: float | None = None) -> dict:
    """The ``proof`` object for an enroll body, signed with the current instance key."""
    csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    ts = round(time.time() if now is None else now, 3)
    statement = _statement(image_id=image_id, fingerprint=fingerprint,
                           csr_key_sha256=key_sha256(csr.public_key()),
                           sealing_public_key=sealing_public_key, ts=ts)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(statement, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(statement)
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(statement, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise ProofError(f"cannot sign a proof with a {type(key).__name__}")
    return {"ts": ts, "signature": base64.b64encode(signature).decode("ascii")}


def verify(key_pem: str, proof, *, image_id: str, fingerprint: str, csr_public_key,
           sealing_public_key: str, now: float | None = None,
           window: float = WINDOW_SECONDS) -> None:
    """Raise :class:`ProofError` unless ``proof`` is a fresh signature by ``key_pem``
    over exactly this request (image, machine, CSR key, sealing key)."""
    if not isinstance(proof, dict):
        raise ProofError("no proof signed by the instance key")
    ts, text = proof.get("ts"), proof.get("signature")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise ProofError("proof.ts must be a number (Unix time)")
    if not isinstance(text, str) or not 0 < len(text) <= MAX_SIGNATURE_CHARS:
        raise ProofError(f"proof.signature must be base64 of at most {MAX_SIGNATURE_CHARS} "
                         "characters")
    now = time.time() if now is None else now
    if abs(now - ts) > window:
        raise ProofError(f"proof is {abs(now - ts):.0f} s away from home's clock "
                         f"(window {window:.0f} s)")
    try:
        signature = base64.b64decode(text, validate=True)
        key = serialization.load_pem_public_key(key_pem.encode("ascii"))
    except (binascii.Error, ValueError) as exc:
        raise ProofError(f"proof unreadable: {exc}") from None
    statement = _statement(image_id=image_id, fingerprint=fingerprint,
                           csr_key_sha256=key_sha256(csr_public_key),
                           sealing_public_key=sealing_public_key, ts=ts)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, statement, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, statement)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, statement, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise ProofError(f"the instance's key type {type(key).__name__} cannot sign proofs")
    except InvalidSignature:
        raise ProofError("proof is not signed by the instance's current key") from None
