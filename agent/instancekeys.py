"""The instance's own identity: keys made at first boot, the instance certificate.

Two keys per instance, both generated here and never leaving the machine (files
0600 under the state directory):

* ``instance.key`` — EC P-256, signs the CSR and is the TLS client key once home
  has issued ``instance.crt`` (short-lived, renewed before expiry);
* ``sealing.key`` — X25519, opens secrets home sealed to this instance
  (:mod:`tether.sealing`).

Until ``instance.crt`` exists the agent connects with the image credential
(``/etc/tether/image.key`` + ``image.crt``) and can only enroll.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from tether.atomicfile import write_atomic
from tether import enrolproof, sealing


INSTANCE_KEY = "instance.key"
INSTANCE_CERT = "instance.crt"
SEALING_KEY = "sealing.key"
#: Renew once this share of the certificate's lifetime has passed.
RENEW_FRACTION = 2 / 3


class InstanceKeyError(RuntimeError):
    """Key or certificate files are unusable; the message says what to do."""


@dataclass
class InstanceKeys:
    signing: ec.EllipticCurvePrivateKey
    sealing: X25519PrivateKey

    @property
    def sealing_public(self) -> str:
        return sealing.public_key_text(self.sealing)

    def signing_fingerprint(self) -> str:
        """sha256 hex of the DER SubjectPublicKeyInfo (as for the image key)."""
        return spki_fingerprint(self.signing.public_key())


def spki_fingerprint(public_key) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _pkcs8(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path):
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise InstanceKeyError(f"{path} has mode {mode:o}; a private key must be 0600 "
                            f"(chmod 600 {path}) or removed to make a new identity")
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise InstanceKeyError(f"{path} is not a readable PEM private key ({exc}); remove "
                            "it and the instance certificate to enroll afresh") from None


def load_or_create_keys(state_dir: Path) -> tuple[InstanceKeys, bool]:
    """The instance keys, generated on first boot; returns (keys, created)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    signing_path, sealing_path = state_dir / INSTANCE_KEY, state_dir / SEALING_KEY
    created = False
    if not signing_path.exists():
        write_atomic(signing_path, _pkcs8(ec.generate_private_key(ec.SECP256R1())))
        (state_dir / INSTANCE_CERT).unlink(missing_ok=True)  # cert of an old key
        created = True
    if not sealing_path.exists():
        write_atomic(sealing_path, sealing.private_key_pem(sealing.generate_private_key()))
        created = True
    signing = _load_key(signing_path)
    if not isinstance(signing, ec.EllipticCurvePrivateKey):
        raise InstanceKeyError(f"{signing_path} is not an EC key; remove it to start afresh")
    seal_key = _load_key(sealing_path)
    if not isinstance(seal_key, X25519PrivateKey):
        raise InstanceKeyError(f"{sealing_path} is not an X25519 key; remove it to start afresh")
    return InstanceKeys(signing, seal_key), created


def make_csr(keys: InstanceKeys, common_name: str) -> str:
    """PEM CSR for the instance key; home chooses the certificate's real subject."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(keys.signing, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def enroll_body(keys: InstanceKeys, image_id: str, machine: dict, now: float) -> dict:
    """The ``enroll`` request: a CSR for the instance key, the sealing key, the
    machine, and a proof signed by the instance key (:mod:`tether.enrolproof`).

    Home needs the proof when the machine is enrolled already (this agent's
    certificate expired while home was away): it is how home tells the instance
    itself from a copy of the image naming the same machine. ``now`` is home's
    clock as the session knows it (local time plus the offset learned at hello).
    """
    csr = make_csr(keys, image_id)
    body = {"csr_pem": csr, "sealing_public_key": keys.sealing_public, "machine": machine}
    body["proof"] = enrolproof.sign(keys.signing, image_id=image_id,
                                    fingerprint=str(machine.get("fingerprint", "")).strip(),
                                    csr_pem=csr, sealing_public_key=keys.sealing_public, now=now)
    return body


def check_issued_cert(cert_pem: str, keys: InstanceKeys, ca_pem: bytes) -> x509.Certificate:
    """Refuse a certificate that is not for our key or not signed by home's CA."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
    except ValueError as exc:
        raise InstanceKeyError(f"home sent an unreadable certificate: {exc}") from None
    if spki_fingerprint(cert.public_key()) != keys.signing_fingerprint():
        raise InstanceKeyError("home issued a certificate for another key; refusing it")
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise InstanceKeyError(f"instance certificate is not signed by home's CA: {exc}") from None
    except Exception as exc:  # InvalidSignature
        raise InstanceKeyError(f"instance certificate signature is invalid: {exc}") from None
    return cert


def store_cert(state_dir: Path, cert: x509.Certificate) -> None:
    write_atomic(state_dir / INSTANCE_CERT,
                 cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def load_cert(state_dir: Path) -> x509.Certificate | None:
    """The stored instance certificate, or None before enrollment."""
    path = state_dir / INSTANCE_CERT
    if not path.exists():
        return None
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        return None


def renew_at(cert: x509.Certificate) -> dt.datetime:
    """When to renew: after RENEW_FRACTION of the validity period."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * RENEW_FRACTION


def needs_renewal(cert: x509.Certificate, now: dt.datetime | None = None) -> bool:
    now = now or dt.datetime.now(dt.timezone.utc)
    return now >= renew_at(cert)


def is_expired(cert: x509.Certificate, now: dt.datetime | None = None) -> bool:
    now = now or dt.datetime.now(dt.timezone.utc)
    return now >= cert.not_valid_after_utc


def key_path(state_dir: Path) -> Path:
    return state_dir / INSTANCE_KEY


def cert_path(state_dir: Path) -> Path:
    return state_dir / INSTANCE_CERT


def file_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777
