"""Enrollment and renewal: image credential + CSR → short-lived instance certificate.

Clone policy: an image may run on at most ``max_instances`` machines (its
connector's setting: 1 for an OVA, more for an AMI in an auto-scaling group).
A machine is known by its fingerprint (DMI product UUID / EC2 instance id). The
same machine enrolling again (reinstalled, state lost) gets its old instance id
back; a new machine beyond the limit is a clone: refused with
``clone_refused``, recorded, and shown by ``tether-home status``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from tether import sealing
from tether.home import pki
from tether.home.errors import HomeError
from tether.home.gate import Identity
from tether.home.logs import event
from tether.home.store import Store
from tether.protocol import ErrorCode

log = logging.getLogger("tether.home.enroll")
MAX_FINGERPRINT = 256


@dataclass
class Authority:
    """What signs instance certificates: the CA plus the lifetime policy."""

    ca_key: object
    ca_cert: object
    ca_pem: str
    config_key_pem: str
    instance_hours: float = pki.INSTANCE_HOURS


def _machine(body: dict) -> tuple[str, dict]:
    machine = body["machine"]
    fingerprint = machine.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint.strip() \
            or len(fingerprint) > MAX_FINGERPRINT:
        raise HomeError(ErrorCode.BAD_TYPE,
                        "machine.fingerprint must be a non-empty string (DMI product UUID "
                        f"or EC2 instance id) of at most {MAX_FINGERPRINT} characters")
    clean = {k: v for k, v in machine.items() if isinstance(v, (str, int, float, bool))}
    return fingerprint.strip(), clean


def _csr(csr_pem: str):
    try:
        return pki.load_csr(csr_pem)
    except pki.PkiError as exc:
        raise HomeError(ErrorCode.BAD_CSR, str(exc)) from None


def enroll(store: Store, authority: Authority, identity: Identity, body: dict) -> dict:
    """Handle an ``enroll`` request from an image-certificate connection."""
    if identity.role != "image":
        raise HomeError(ErrorCode.UNAUTHORIZED,
                        "only an image credential enrolls; an enrolled instance uses renew")
    fingerprint, machine = _machine(body)
    csr = _csr(body["csr_pem"])
    try:
        sealing.load_public_key(body["sealing_public_key"])
    except (sealing.SealingError, ValueError) as exc:
        raise HomeError(ErrorCode.BAD_CSR, f"sealing_public_key unusable: {exc}") from None
    limit = _limit(store, identity)
    clone_count = None
    with store.transaction():
        existing = store.instance_for_machine(identity.image_id, fingerprint)
        if existing is not None:
            instance_id = existing["instance_id"]
            store.reenroll_instance(instance_id, machine, body["sealing_public_key"])
            response = _issue(store, authority, csr, instance_id, identity)
        elif store.count_instances(identity.image_id) >= limit:
            clone_count = store.count_instances(identity.image_id)
        else:
            instance_id = str(uuid.uuid4())
            store.add_instance(instance_id, identity.image_id, identity.connector, fingerprint,
                               machine, body["sealing_public_key"])
            response = _issue(store, authority, csr, instance_id, identity)
    if clone_count is not None:
        store.record_clone(identity.image_id, identity.connector, fingerprint, machine)
        raise _clone(identity, fingerprint, clone_count, limit)
    event(log, logging.INFO, "enrolled", instance=instance_id, image=identity.image_id,
          connector=identity.connector, machine=fingerprint, again=existing is not None,
          serial=response["serial"])
    return response


def _limit(store: Store, identity: Identity) -> int:
    """Machines this image may run on: its own setting, else its connector's."""
    image = store.image(identity.image_id)
    if image and image.get("max_instances"):
        return image["max_instances"]
    return store.connector(identity.connector)["max_instances"]


def _clone(identity: Identity, fingerprint: str, count: int, limit: int) -> HomeError:
    event(log, logging.WARNING, "clone_refused", image=identity.image_id,
          connector=identity.connector, machine=fingerprint, instances=count, limit=limit)
    return HomeError(ErrorCode.CLONE_REFUSED,
                     f"image {identity.image_id} already runs on {count} machine(s), the "
                     f"image allows {limit}: this machine is a clone. Deploy a freshly "
                     "downloaded image, or raise the limit (`tether-home connector set "
                     f"{identity.connector} --max-instances N`)",
                     limit=limit)


def renew(store: Store, authority: Authority, identity: Identity, body: dict) -> dict:
    """Handle ``renew``: a fresh short-lived certificate for an enrolled instance."""
    if identity.role != "instance":
        raise HomeError(ErrorCode.UNAUTHORIZED, "renew needs an instance certificate; "
                        "an image credential enrolls instead")
    csr = _csr(body["csr_pem"])
    with store.transaction():
        response = _issue(store, authority, csr, identity.instance_id, identity)
    event(log, logging.INFO, "renewed", instance=identity.instance_id,
          connector=identity.connector, serial=response["serial"])
    return response


def _issue(store: Store, authority: Authority, csr, instance_id: str, identity: Identity) -> dict:
    issued = pki.issue_instance(authority.ca_key, authority.ca_cert, csr, instance_id,
                                identity.connector, authority.instance_hours)
    store.add_cert(issued.serial, "instance", f"instance:{instance_id}", issued.not_before,
                   issued.not_after, connector=identity.connector, image_id=identity.image_id,
                   instance_id=instance_id)
    store.set_instance_cert(instance_id, issued.serial, issued.not_after)
    return {"instance_id": instance_id, "cert_pem": issued.pem, "ca_pem": authority.ca_pem,
            "not_after": issued.not_after, "renew_after": pki.renew_after(issued),
            "config_key_pem": authority.config_key_pem, "serial": issued.serial}
