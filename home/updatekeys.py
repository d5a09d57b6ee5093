"""Home's update signing key and its CA: what whole-image update bundles are signed with.

Separate from home's CA on purpose: that CA issues TLS certificates to
agents, images and the server; the update CA signs nothing but the one
code-signing certificate of the bundle key, and an appliance's RAUC keyring
holds only the update CA (docs/CONTRACTS.md, "Update bundle"). A leak of a
TLS key then never lets anyone sign firmware, and the other way round.

`tether-home init` creates them; a home initialized before updates existed
gets them on first use (`ensure`), so no operator step is needed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from . import pki
from .paths import StatePaths, write_private, write_public

SIGNING_DAYS = 3650


@dataclass(frozen=True)
class UpdateKeys:
    """Files of the update key in a home state directory (update/)."""

    root: Path

    @classmethod
    def of(cls, paths: StatePaths) -> "UpdateKeys":
        return cls(paths.root / "update")

    @property
    def ca_key(self) -> Path:
        return self.root / "update-ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "update-ca.crt"

    @property
    def signing_key(self) -> Path:
        return self.root / "update-signing.key"

    @property
    def signing_cert(self) -> Path:
        return self.root / "update-signing.crt"

    def exists(self) -> bool:
        return all(p.is_file() for p in (self.ca_key, self.ca_cert, self.signing_key, self.signing_cert))


def ensure(paths: StatePaths) -> UpdateKeys:
    """The update CA and signing key of this home, created when missing."""
    keys = UpdateKeys.of(paths)
    if keys.exists():
        return keys
    keys.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key, ca_cert = pki.create_ca("tether update CA")
    key = pki.new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "tether"),
                                     x509.NameAttribute(x509.NameOID.COMMON_NAME, "tether update signing")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=SIGNING_DAYS), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    # The signing pair first, the CA last: exists() is true only when all four are written.
    write_private(keys.signing_key, pki.key_pem(key))
    write_public(keys.signing_cert, pki.cert_pem(cert))
    write_private(keys.ca_key, pki.key_pem(ca_key))
    write_public(keys.ca_cert, pki.cert_pem(ca_cert))
    return keys
