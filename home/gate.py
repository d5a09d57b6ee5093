"""Who is on the other end: turn a verified client certificate into an identity.

TLS already proved the certificate is from home's CA and unexpired. The gate
adds what TLS cannot know: the certificate is one home issued and still
trusts (a row in the ``certs`` table, not revoked) and whether it speaks for
an *image* (may only enroll) or an *instance* (everything else). A refusal is
an HTTP status before the WebSocket opens, so a revoked appliance never gets
as far as the protocol.
"""

from __future__ import annotations

import http
import time
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from tether import enrolproof
from tether.home import pki
from tether.home.sqlite import ENGINE_ERRORS
from tether.home.stores import Certificates, Instances


@dataclass(frozen=True)
class Identity:
    """What a connection may do, derived from its certificate's database row."""

    role: str  # "image" or "instance"
    serial: str
    connector: str
    image_id: str
    instance_id: str | None
    not_after: float


class Refusal(Exception):
    """The connection is refused before the WebSocket handshake completes."""

    def __init__(self, status: http.HTTPStatus, reason: str, text: str) -> None:
        super().__init__(f"{reason}: {text}")
        self.status = status
        self.reason = reason
        self.text = text


class CertificateRecords(Certificates, Instances, Protocol):
    """What the gate reads (and, for an instance enrolled before home kept keys, writes)."""


def identify(store: CertificateRecords, cert: x509.Certificate | None, now: float | None = None) -> Identity:
    """Map a client certificate to an :class:`Identity` or raise :class:`Refusal`."""
    now = time.time() if now is None else now
    if cert is None:
        raise Refusal(http.HTTPStatus.UNAUTHORIZED, "no_certificate",
                      "a client certificate from home's CA is required")
    serial = pki.serial_hex(cert)
    row = store.cert(serial)
    if row is None:
        raise Refusal(http.HTTPStatus.FORBIDDEN, "unknown_certificate",
                      f"certificate {serial} was not issued by this home's database; "
                      "re-issue the image credential")
    if row["revoked_at"] is not None:
        raise Refusal(http.HTTPStatus.FORBIDDEN, "revoked",
                      f"certificate {serial} is revoked ({row['revoke_reason'] or 'no reason'})")
    if row["not_after"] < now:
        raise Refusal(http.HTTPStatus.FORBIDDEN, "expired",
                      f"certificate {serial} expired; an instance re-enrolls with its image "
                      "credential")
    if row["kind"] not in ("image", "instance"):
        raise Refusal(http.HTTPStatus.FORBIDDEN, "wrong_kind",
                      f"a {row['kind']} certificate cannot connect as an agent")
    if row["kind"] == "instance":
        instance = store.instance(row["instance_id"])
        if instance is None:
            raise Refusal(http.HTTPStatus.FORBIDDEN, "unknown_instance",
                          "the instance behind this certificate is no longer registered")
        if instance["key_spki"] is None and instance["reset_at"] is None:
            _adopt_key(store, instance["instance_id"], cert)
    return Identity(role=row["kind"], serial=serial, connector=row["connector"],
                    image_id=row["image_id"], instance_id=row["instance_id"],
                    not_after=row["not_after"])


def _adopt_key(store: CertificateRecords, instance_id: str, cert: x509.Certificate) -> None:
    """Record the key of an instance enrolled before home kept instance keys.

    Its valid certificate proves the key is the instance's, and a re-enrolment
    must later be signed by it (:mod:`tether.home.enroll`). A disk that refuses
    the write only postpones this to the next connection.
    """
    try:
        store.set_instance_key(instance_id, enrolproof.public_key_pem(cert.public_key()))
    except ENGINE_ERRORS:
        pass


def offered_subprotocols(headers) -> list[str]:
    """All values of Sec-WebSocket-Protocol (comma lists, possibly repeated)."""
    values = []
    for header in headers.get_all("Sec-WebSocket-Protocol"):
        values.extend(v.strip() for v in header.split(",") if v.strip())
    return values
