"""Enrollment and renewal: image credential + CSR → short-lived instance certificate.

Clone policy: an image may run on at most ``max_instances`` machines (its
connector's setting: 1 for an OVA, more for an AMI in an auto-scaling group).
A machine is known by its fingerprint (DMI product UUID / EC2 instance id).

Possession, not the image credential, decides who an enrolled instance is
(issue 11). Every copy of an image carries the same image credential and
copies leak, so an enrolment naming an enrolled machine's fingerprint is
accepted only with a proof signed by the instance's *current* key
(:mod:`tether.enrolproof`: the agent whose certificate expired while home was
away), or after the operator's ``tether-home instance reset`` (an appliance
that lost its state). Anything else is a clone: refused with
``clone_refused``, counted in the ``clones`` table, logged as an audit event,
and the enrolled instance keeps its keys, certificate and configuration. A
new machine beyond the limit is a clone as well.

Certificates stay few: issuing one revokes the instance's others except the
one the renewing socket uses, so an instance has at most two valid
certificates (current and next).

Rates (:class:`Limits`): enrolments that add a machine are bounded by the
image's max-instances; re-keying an enrolled instance counts against that
instance like renewals; everything else an image credential asks (refusals,
bad requests) counts against the image, and clone rows written count against
the image again. An exhausted bucket refuses with ``busy`` and the hub closes
the socket (:class:`RateLimited`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from tether import enrolproof, sealing
from tether.home import pki
from tether.home.errors import HomeError
from tether.home.gate import Identity
from tether.home.logs import event
from tether.home.ratelimit import RateLimit
from tether.home.store import Store
from tether.protocol import ErrorCode

log = logging.getLogger("tether.home.enroll")
MAX_FINGERPRINT = 256
#: The machine facts home keeps (tether.agent.machine.Machine.as_dict), each bounded.
MACHINE_FIELDS = ("platform", "fingerprint", "fingerprint_source", "vendor", "product")
MAX_MACHINE_VALUE = 256
#: Machines per image with a clone row of their own (the rest share one row).
MAX_CLONE_ROWS = 100


class RateLimited(HomeError):
    """A peer spent its bucket: refused with ``busy``; the hub then closes its socket."""

    def __init__(self, what: str, key: str, retry_after: float) -> None:
        super().__init__(ErrorCode.BUSY,
                         f"too many {what} for {key}; home closes this connection, try again "
                         f"in {max(1.0, retry_after):.0f} s", retry_after=round(retry_after, 1))


@dataclass
class Limits:
    """Token buckets for the enrolment requests (:mod:`tether.home.ratelimit`).

    ``refusals``: enrol requests of an image credential that add no machine
    (refused, malformed), per image. ``rekeys``: renewals and proven re-enrolments,
    per instance (an agent renews every 16 h and retries at most once a minute).
    ``clones``: clone rows written, per image.
    """

    refusals: RateLimit = field(default_factory=lambda: RateLimit(rate=1.0, burst=30))
    rekeys: RateLimit = field(default_factory=lambda: RateLimit(rate=1 / 60, burst=10))
    clones: RateLimit = field(default_factory=lambda: RateLimit(rate=0.2, burst=10))
    max_clone_rows: int = MAX_CLONE_ROWS

    @staticmethod
    def take(bucket: RateLimit, key: str, what: str) -> None:
        if not bucket.allow(key):
            raise RateLimited(what, key, bucket.retry_after(key))


@dataclass
class Authority:
    """What signs instance certificates: the CA plus the lifetime policy."""

    ca_key: object
    ca_cert: object
    ca_pem: str
    config_key_pem: str
    instance_hours: float = pki.INSTANCE_HOURS


@dataclass
class _Request:
    fingerprint: str
    machine: dict
    csr: object
    key_pem: str
    sealing_public_key: str
    proof: object


@dataclass
class _Refusal:
    reason: str  # "limit" | "machine_enrolled"
    error: HomeError
    instance_id: str | None = None
    fields: dict = field(default_factory=dict)


def _machine(body: dict) -> tuple[str, dict]:
    machine = body["machine"]
    fingerprint = machine.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint.strip() \
            or len(fingerprint) > MAX_FINGERPRINT:
        raise HomeError(ErrorCode.BAD_TYPE,
                        "machine.fingerprint must be a non-empty string (DMI product UUID "
                        f"or EC2 instance id) of at most {MAX_FINGERPRINT} characters")
    clean = {k: (v[:MAX_MACHINE_VALUE] if isinstance(v, str) else v)
             for k, v in machine.items()
             if k in MACHINE_FIELDS and isinstance(v, (str, int, float, bool))}
    return fingerprint.strip(), clean


def _csr(csr_pem: str):
    try:
        return pki.load_csr(csr_pem)
    except pki.PkiError as exc:
        raise HomeError(ErrorCode.BAD_CSR, str(exc)) from None


def _parse(body: dict) -> _Request:
    fingerprint, machine = _machine(body)
    csr = _csr(body["csr_pem"])
    try:
        sealing.load_public_key(body["sealing_public_key"])
    except (sealing.SealingError, ValueError) as exc:
        raise HomeError(ErrorCode.BAD_CSR, f"sealing_public_key unusable: {exc}") from None
    return _Request(fingerprint, machine, csr, enrolproof.public_key_pem(csr.public_key()),
                    body["sealing_public_key"], body.get("proof"))


def enroll(store: Store, authority: Authority, identity: Identity, body: dict,
           limits: Limits | None = None) -> dict:
    """Handle an ``enroll`` request from an image-certificate connection."""
    if identity.role != "image":
        raise HomeError(ErrorCode.UNAUTHORIZED,
                        "only an image credential enrolls; an enrolled instance uses renew")
    image_key = f"image {identity.image_id}"
    try:
        request = _parse(body)
    except HomeError:
        if limits is not None:
            Limits.take(limits.refusals, image_key, "refused enrolments")
        raise
    limit = _limit(store, identity)
    with store.transaction():
        existing = store.instance_for_machine(identity.image_id, request.fingerprint)
        if existing is None:
            count = store.count_instances(identity.image_id)
            if count < limit:
                instance_id = str(uuid.uuid4())
                store.add_instance(instance_id, identity.image_id, identity.connector,
                                   request.fingerprint, request.machine,
                                   request.sealing_public_key, request.key_pem)
                return _enrolled(store, authority, identity, request, instance_id, "new")
            refusal = _over_limit(identity, count, limit)
        else:
            instance_id = existing["instance_id"]
            how, why = _may_rekey(existing, identity, request)
            if how is not None:
                if limits is not None:
                    Limits.take(limits.rekeys, f"instance {instance_id}", "re-enrolments")
                store.reenroll_instance(instance_id, request.machine,
                                        request.sealing_public_key, request.key_pem)
                return _enrolled(store, authority, identity, request, instance_id, how)
            refusal = _machine_enrolled(identity, request.fingerprint, instance_id, why)
    if limits is not None:
        Limits.take(limits.refusals, image_key, "refused enrolments")
        Limits.take(limits.clones, image_key, "clone records")
    store.record_clone(identity.image_id, identity.connector, request.fingerprint,
                       request.machine, reason=refusal.reason, instance_id=refusal.instance_id,
                       max_rows=limits.max_clone_rows if limits else MAX_CLONE_ROWS)
    event(log, logging.WARNING, "clone_refused", image=identity.image_id,
          connector=identity.connector, machine=request.fingerprint, reason=refusal.reason,
          instance=refusal.instance_id, **refusal.fields)
    raise refusal.error


def _may_rekey(existing: dict, identity: Identity,
               request: _Request) -> tuple[str | None, str | None]:
    """("proof" | "reset", None) when the enrolled instance may get new keys, else
    (None, why not)."""
    if existing["key_spki"] is None:
        if existing["reset_at"] is not None:
            return "reset", None
        return None, "home recorded no key for this instance (enrolled before keys were kept)"
    try:
        enrolproof.verify(existing["key_spki"], request.proof, image_id=identity.image_id,
                          fingerprint=request.fingerprint, csr_public_key=request.csr.public_key(),
                          sealing_public_key=request.sealing_public_key)
    except enrolproof.ProofError as exc:
        return None, str(exc)
    return "proof", None


def _enrolled(store: Store, authority: Authority, identity: Identity, request: _Request,
              instance_id: str, how: str) -> dict:
    response, revoked = _issue(store, authority, request.csr, instance_id, identity)
    event(log, logging.INFO if how != "reset" else logging.WARNING, "enrolled",
          instance=instance_id, image=identity.image_id, connector=identity.connector,
          machine=request.fingerprint, again=how != "new", how=how, serial=response["serial"],
          revoked=revoked or None)
    return response


def _limit(store: Store, identity: Identity) -> int:
    """Machines this image may run on: its own setting, else its connector's."""
    image = store.image(identity.image_id)
    if image and image.get("max_instances"):
        return image["max_instances"]
    return store.connector(identity.connector)["max_instances"]


def _over_limit(identity: Identity, count: int, limit: int) -> _Refusal:
    return _Refusal("limit", HomeError(
        ErrorCode.CLONE_REFUSED,
        f"image {identity.image_id} already runs on {count} machine(s), the image allows "
        f"{limit}: this machine is a clone. Deploy a freshly downloaded image, or raise the "
        f"limit (`tether-home connector set {identity.connector} --max-instances N`)",
        limit=limit), fields={"instances": count, "limit": limit})


def _machine_enrolled(identity: Identity, fingerprint: str, instance_id: str,
                      why: str) -> _Refusal:
    return _Refusal("machine_enrolled", HomeError(
        ErrorCode.CLONE_REFUSED,
        f"machine {fingerprint} is enrolled already as instance {instance_id}, and this "
        "request is not signed by that instance's key: a copy of the image cannot take an "
        "enrolled instance over. If this appliance lost its state, the operator runs "
        f"`tether-home instance reset {instance_id}` on home and it then enrolls afresh",
        instance_id=instance_id), instance_id=instance_id, fields={"proof": why})


def renew(store: Store, authority: Authority, identity: Identity, body: dict,
          limits: Limits | None = None) -> dict:
    """Handle ``renew``: a fresh short-lived certificate for an enrolled instance.

    The instance re-keys itself here (the CSR may carry a new key): its socket's
    certificate is the proof. That certificate stays valid (its sockets stay
    up); every older one is revoked.
    """
    if identity.role != "instance":
        raise HomeError(ErrorCode.UNAUTHORIZED, "renew needs an instance certificate; "
                        "an image credential enrolls instead")
    if limits is not None:
        Limits.take(limits.rekeys, f"instance {identity.instance_id}", "renewals")
    csr = _csr(body["csr_pem"])
    with store.transaction():
        response, revoked = _issue(store, authority, csr, identity.instance_id, identity,
                                   keep=identity.serial)
        store.set_instance_key(identity.instance_id, enrolproof.public_key_pem(csr.public_key()))
    event(log, logging.INFO, "renewed", instance=identity.instance_id,
          connector=identity.connector, serial=response["serial"],
          revoked=revoked or None)
    return response


def _issue(store: Store, authority: Authority, csr, instance_id: str, identity: Identity,
           keep: str | None = None) -> tuple[dict, list[str]]:
    """Sign a certificate and revoke the instance's others but ``keep`` (at most two
    stay valid: the one in use and the new one); returns the response and the
    serials revoked."""
    issued = pki.issue_instance(authority.ca_key, authority.ca_cert, csr, instance_id,
                                identity.connector, authority.instance_hours)
    store.add_cert(issued.serial, "instance", f"instance:{instance_id}", issued.not_before,
                   issued.not_after, connector=identity.connector, image_id=identity.image_id,
                   instance_id=instance_id)
    revoked = store.revoke_instance_certs(instance_id, [issued.serial, *([keep] if keep else [])],
                                          f"replaced by {issued.serial}")
    store.set_instance_cert(instance_id, issued.serial, issued.not_after)
    return {"instance_id": instance_id, "cert_pem": issued.pem, "ca_pem": authority.ca_pem,
            "not_after": issued.not_after, "renew_after": pki.renew_after(issued),
            "config_key_pem": authority.config_key_pem, "serial": issued.serial}, revoked
