"""Network probes for the self-check: DNS of home, reachability, clock skew.

Clock skew comes from the HTTP ``Date`` header of home's handshake response
(websockets sets it on both the 101 and on rejections), so the probe needs no
extra endpoint at home and works through the same proxy as the channel.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from urllib.parse import urlsplit

from .selfcheck import HomeProbe


def skew_from_date(date_header: str | None, sent_at: float, received_at: float) -> float | None:
    """Home's clock minus ours, in seconds, from an HTTP Date header.

    Date has one-second resolution and truncates, so home's true time lies in
    ``[D, D+1)``: the estimate is ``D + 0.5`` against the midpoint of our request.
    """
    if not date_header:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(date_header)
    except (TypeError, ValueError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None
    return parsed.timestamp() + 0.5 - (sent_at + received_at) / 2


def host_port(url: str) -> tuple[str, int]:
    """Host and port of a ws:// or wss:// URL (443/80 by default)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"home URL {url!r} must look like wss://host[:port]/")
    return parts.hostname, parts.port or (443 if parts.scheme == "wss" else 80)


async def resolve(host: str, port: int, timeout: float = 5.0) -> list[str]:
    """Addresses of ``host`` via the system resolver (getaddrinfo)."""
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    return sorted({info[4][0] for info in infos})


async def probe_home(url: str, connect, timeout: float = 5.0,
                     via_proxy: bool = False) -> HomeProbe:
    """Resolve and reach home; ``connect()`` opens (and closes) one handshake.

    ``connect`` is an async callable returning the handshake response headers
    (or raising); the channel supplies one bound to its TLS context and proxy.
    Behind a proxy home's name is resolved by the proxy, so DNS is not judged.
    """
    host, port = host_port(url)
    probe = HomeProbe(host=host)
    if not via_proxy:
        try:
            probe.addresses = await resolve(host, port, timeout)
            probe.dns_ok = True
        except (OSError, asyncio.TimeoutError) as exc:
            probe.dns_ok, probe.reachable = False, False
            probe.error = f"DNS: {exc or 'timeout'}"
            return probe
    sent = time.time()
    try:
        headers = await asyncio.wait_for(connect(), timeout)
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        headers = getattr(getattr(exc, "response", None), "headers", None)
        if headers is None:
            probe.reachable = False
            probe.error = f"{type(exc).__name__}: {exc}"
            return probe
    probe.reachable = True
    probe.clock_skew_s = skew_from_date(headers.get("Date"), sent, time.time())
    return probe
