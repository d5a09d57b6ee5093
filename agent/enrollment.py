"""The instance certificate: enroll with the image credential, renew over a live socket.

At first boot (or when the instance certificate is gone or expired) the agent
dials home with the image credential, sends ``enroll`` (CSR, sealing key, proof
of the instance key) and keeps what home issues; from then on it renews after
2/3 of the certificate's life over one of its sockets, never faster than
``renew_min_interval_s`` (home's back-dating or a skewed clock could make a
certificate due at once). The instance id and certificate serial live in
``instance.json`` next to the keys.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from tether.atomicfile import write_atomic
from tether import protocol as p

from . import instancekeys
from .backoff import Backoff
from .channel import DialPlan
from .config import ConfigStore
from .link import RequestFailed
from .machine import Machine
from .settings import Settings
from .sockets import Sockets

if TYPE_CHECKING:
    from .link import Link

log = logging.getLogger("tether.agent")

INSTANCE_FILE = "instance.json"

#: dial home with the image credential along ``plan``: (link, reader) or None once stopping
OpenImageSocket = Callable[[DialPlan], Awaitable["tuple[Link, asyncio.Task] | None"]]


async def sleep_or_stop(event: asyncio.Event, timeout: float) -> bool:
    """Sleep ``timeout`` seconds or until ``event`` is set; True when it was set."""
    try:
        await asyncio.wait_for(event.wait(), max(0.0, timeout))
        return True
    except asyncio.TimeoutError:
        return False


class Enrollment:
    """This instance's id and certificate, and how to get (and keep) them."""

    def __init__(self, state_dir: Path, settings: Settings, keys: instancekeys.InstanceKeys,
                 machine: Machine, store: ConfigStore, *, stopping: asyncio.Event,
                 status: Callable[[str], object], renew_min_interval_s: float) -> None:
        self.state_dir = state_dir
        self.settings = settings
        self.keys = keys
        self.machine = machine
        self.store = store  # learns the instance id and home's config key
        self.stopping = stopping
        self.status = status  # systemd status line
        self.renew_min_interval_s = renew_min_interval_s
        self.instance_id: str | None = self._load_instance().get("instance_id")
        self.store.instance_id = self.instance_id
        self.error: str | None = None  # why the last enrollment failed

    def _load_instance(self) -> dict:
        try:
            return json.loads((self.state_dir / INSTANCE_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def has_identity(self) -> bool:
        cert = instancekeys.load_cert(self.state_dir)
        return bool(cert and self.instance_id and not instancekeys.is_expired(cert))

    async def ensure_enrolled(self, open_image_socket: OpenImageSocket) -> bool:
        """Enroll with the image certificate unless a valid instance cert exists."""
        if self.has_identity():
            return True
        plan = DialPlan(list(self.settings.home_urls), Backoff())
        self.status("enrolling with home")
        while not self.stopping.is_set():
            got = await open_image_socket(plan)
            if got is None:
                return False
            link, reader = got
            try:
                response = await link.request(p.Op.ENROLL, instancekeys.enroll_body(
                    self.keys, self.settings.image_id, self.machine.as_dict(),
                    time.time() + link.session.clock_offset))
                self.store_issued(response.body)
                self.error = None
                log.info("enrolled as instance %s", self.instance_id,
                         extra={"tether_instance": self.instance_id})
                return True
            except (RequestFailed, instancekeys.InstanceKeyError, ConnectionError,
                    asyncio.TimeoutError) as exc:
                self.error = getattr(exc, "code", type(exc).__name__)
                delay = plan.backoff.next_delay()
                log.error("enrollment failed: %s; retrying in %.0f s", exc, delay,
                          extra={"tether_error": self.error})
                self.status(f"enrollment refused by home: {self.error}")
            finally:
                await link.close("enrollment done")
                reader.cancel()
            if await sleep_or_stop(self.stopping, delay):
                return False
        return False

    def store_issued(self, body: dict) -> x509.Certificate:
        """Check and keep the instance certificate from an enroll/renew response."""
        cert = instancekeys.check_issued_cert(body["cert_pem"], self.keys,
                                              self.settings.ca_cert.read_bytes())
        instancekeys.store_cert(self.state_dir, cert)
        self.instance_id = body["instance_id"]
        self.store.instance_id = self.instance_id
        write_atomic(self.state_dir / INSTANCE_FILE, json.dumps({
            "instance_id": self.instance_id, "image_id": self.settings.image_id,
            "not_after": body.get("not_after"), "cert_serial": format(cert.serial_number, "x"),
        }).encode(), mode=0o600)
        if isinstance(body.get("config_key_pem"), str):
            self.store.set_verify_key(body["config_key_pem"])
        return cert

    async def renewal_loop(self, sockets: Sockets, open_image_socket: OpenImageSocket) -> None:
        """Renew the instance certificate after 2/3 of its life, over a live socket."""
        last_attempt = -float("inf")
        while not self.stopping.is_set():
            cert = instancekeys.load_cert(self.state_dir)
            if cert is None or instancekeys.is_expired(cert):
                await self.ensure_enrolled(open_image_socket)
                continue
            due_in = max((instancekeys.renew_at(cert) - _utcnow()).total_seconds(),
                         last_attempt + self.renew_min_interval_s - time.monotonic())
            if due_in > 0:
                await sleep_or_stop(self.stopping, min(due_in, 300))
                continue
            link = sockets.pick()
            if link is None:
                await sleep_or_stop(self.stopping, 5)
                continue
            last_attempt = time.monotonic()
            try:
                response = await link.request(p.Op.RENEW, {
                    "csr_pem": instancekeys.make_csr(self.keys, self.instance_id or "instance")})
                cert = self.store_issued(response.body)
                log.info("instance certificate renewed; valid until %s",
                         cert.not_valid_after_utc.isoformat(),
                         extra={"tether_cert_serial": format(cert.serial_number, "x")})
            except Exception as exc:  # noqa: BLE001 - retry later, the old cert still works
                log.warning("certificate renewal failed: %s; retrying later", exc)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
