"""The agent's self-check as it runs: the local measurements plus what dialing taught.

Why the sockets feed it: whether home is reachable, whether DNS works and how
far our clock is off are best learned from the real sockets (a failed dial, an
accepted hello and its ``server_time``), not from separate probes. Every change
re-evaluates the verdict, so heartbeats and status always say the current one.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from . import netfacts, selfcheck
from .probes import host_port

if TYPE_CHECKING:
    from .link import Link

log = logging.getLogger("tether.agent")


class Health:
    """The self-check report, the home probe the sockets update, our reported address."""

    def __init__(self, state_dir: Path, dmi_dir: Path, home_url: str,
                 firstboot_path: Path) -> None:
        self.state_dir = state_dir
        self.dmi_dir = dmi_dir
        self.firstboot_path = firstboot_path
        self.home_probe = selfcheck.HomeProbe(host=host_port(home_url)[0])
        self.report: selfcheck.Report | None = None
        self.local_address: str | None = None  # our end of the socket home: reported address

    def measure(self) -> selfcheck.Report:
        """Measure the host again (~1 ms of psutil reads) and judge it."""
        measured = selfcheck.measure_host(self.state_dir, self.dmi_dir, self.home_probe)
        self.report = selfcheck.evaluate(measured)
        if self.report.shortfalls:
            log.warning("self-check: degraded: %s",
                        "; ".join(s.message for s in self.report.shortfalls),
                        extra={"tether_verdict": self.report.verdict})
        return self.report

    def _judge(self) -> None:
        """The verdict follows the probe."""
        self.report = selfcheck.evaluate(self.report.measured)

    def body(self) -> dict:
        """The self-check report plus the network facts (addresses, refused first-boot values)."""
        body = self.report.as_dict()
        body["network"] = netfacts.describe(self.firstboot_path, self.local_address)
        return body

    def socket_opened(self, link: Link, via_proxy: bool) -> None:
        """A socket is open (TCP, TLS, WebSocket done) and about to say hello: home is reachable."""
        probe = self.home_probe
        probe.reachable, probe.error = True, ""
        if probe.dns_ok is False:
            probe.dns_ok = None if via_proxy else True
        self._judge()
        local = link.ws.local_address
        self.local_address = str(local[0]) if local else None

    def dial_failed(self, url: str, exc: BaseException) -> None:
        """A failed dial says something about reaching home: keep it for self-check."""
        probe = self.home_probe
        probe.reachable = False
        probe.error = f"{type(exc).__name__}: {exc}"[:300]
        if isinstance(exc, socket.gaierror):
            probe.dns_ok = False
        self._judge()

    def home_answered(self, link: Link, via_proxy: bool) -> None:
        """Home accepted hello: it is reachable, and its ``server_time`` gives our clock skew."""
        body = link.hello_response.body
        midpoint = link.hello_sent_at + link.hello_rtt / 2
        probe = self.home_probe
        probe.host = host_port(link.url)[0]
        probe.reachable, probe.error = True, ""
        probe.dns_ok = None if via_proxy else True
        probe.clock_skew_s = round(float(body["server_time"]) - midpoint, 3)
        self._judge()
