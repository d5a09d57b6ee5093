"""Home's certificate authority: the CA, home's server certificate, image and
instance client certificates.

Home's CA is the only trust anchor on both sides: agents pin it for the server,
home accepts client certificates signed by it only. Client certificates say
what they are in their subject so logs are readable, but home decides a
connection's rights from the certificate's *serial*, looked up in its database
(:mod:`tether.home.store`), never from the subject alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825
IMAGE_DAYS = 3650
#: Instance certificates are short-lived; agents renew after 2/3 of the lifetime.
INSTANCE_HOURS = 24
RENEW_FRACTION = 2 / 3
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew on fresh certs


class PkiError(ValueError):
    """A key, certificate or CSR is unusable; the message says why."""


@dataclass(frozen=True)
class Issued:
    """A freshly issued certificate and its bookkeeping facts."""

    cert: x509.Certificate
    serial: str
    not_before: float
    not_after: float

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def new_key() -> ec.EllipticCurvePrivateKey:
    """EC P-256: small, fast, supported by every TLS 1.3 stack."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    """PKCS#8 PEM, unencrypted (files are 0600; the state dir is home's vault)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def serial_hex(cert_or_serial: x509.Certificate | int) -> str:
    """Lower-case hex serial, the key under which home records certificates."""
    serial = cert_or_serial if isinstance(cert_or_serial, int) else cert_or_serial.serial_number
    return format(serial, "x")


def spki_fingerprint(public_key) -> str:
    """sha256 hex of the DER SubjectPublicKeyInfo (the credential bundle's fingerprint)."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tether")]
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit[:64]))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]))
    return x509.Name(attrs)


def create_ca(common_name: str = "tether home CA") -> tuple[object, x509.Certificate]:
    """A new self-signed CA that may sign end-entity certificates only (pathlen 0)."""
    key = new_key()
    now = _now()
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert: x509.Certificate, public_key, subject: x509.Name,
          lifetime: dt.timedelta, eku, sans: list | None = None) -> Issued:
    """Sign an end-entity certificate with the CA; never longer-lived than the CA."""
    now = _now()
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - _BACKDATE)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_cert.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert, serial_hex(cert), (now - _BACKDATE).timestamp(), not_after.timestamp())


def server_names(names: list[str]) -> list[x509.GeneralName]:
    """--name values as SANs: IP literals become IPAddress, the rest DNSName."""
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not name or any(c.isspace() for c in name) or "/" in name:
                raise PkiError(
                    f"--name {name!r} is neither a host name nor an IP address") from None
            sans.append(x509.DNSName(name))
    return sans


def issue_server(ca_key, ca_cert, names: list[str]) -> tuple[object, Issued]:
    """Home's TLS server key and certificate for the given host names/addresses."""
    if not names:
        raise PkiError("home's server certificate needs at least one --name")
    key = new_key()
    issued = _leaf(ca_key, ca_cert, key.public_key(), _name(names[0], "home"),
                   dt.timedelta(days=SERVER_DAYS), ExtendedKeyUsageOID.SERVER_AUTH,
                   server_names(names))
    return key, issued


def issue_image(ca_key, ca_cert, image_id: str, connector: str) -> tuple[object, Issued]:
    """A key pair made for one image plus its client certificate (enroll-only rights)."""
    key = new_key()
    issued = _leaf(ca_key, ca_cert, key.public_key(), _name(f"image:{image_id}", connector),
                   dt.timedelta(days=IMAGE_DAYS), ExtendedKeyUsageOID.CLIENT_AUTH)
    return key, issued


def load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """Parse a CSR and check its self-signature and key type."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii", "strict"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise PkiError(f"csr_pem is not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise PkiError("the CSR's signature does not match its key")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.key_size < 256:
            raise PkiError("EC keys must be at least 256 bits")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PkiError("RSA keys must be at least 2048 bits")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise PkiError(f"unsupported key type {type(key).__name__} in CSR; use EC P-256")
    return csr


def issue_instance(ca_key, ca_cert, csr: x509.CertificateSigningRequest, instance_id: str,
                   connector: str, hours: float = INSTANCE_HOURS) -> Issued:
    """Short-lived client certificate for an enrolled instance's own key.

    The subject comes from home, not from the CSR: the agent only proves it
    holds the key.
    """
    return _leaf(ca_key, ca_cert, csr.public_key(), _name(f"instance:{instance_id}", connector),
                 dt.timedelta(hours=hours), ExtendedKeyUsageOID.CLIENT_AUTH)


def renew_after(issued: Issued) -> float:
    """When the agent should renew: after 2/3 of the certificate's lifetime."""
    return issued.not_before + (issued.not_after - issued.not_before) * RENEW_FRACTION


def load_cert_pem(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data)


def load_key_pem(data: bytes):
    return serialization.load_pem_private_key(data, password=None)


def is_signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when ``ca_cert`` issued ``cert`` (signature checked)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
