"""What the appliance's network looks like, reported home with the self-check.

The appliance has no console anyone reads, so the operator learns from home
which address it got (DHCP or the static one from the OVF properties) and which
first-boot values were refused (a prefix of 40, a proxy without scheme...): the
first-boot service falls back to DHCP for those and writes them into
``/run/tether/firstboot.json``'s ``rejected`` list, and this module carries that
list home once a socket is up.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path

import psutil

#: Bounded so a broken first-boot file cannot inflate every hello.
MAX_REJECTED = 32
MAX_ADDRESSES = 64


def interface_addresses() -> list[dict]:
    """Non-loopback IPv4/IPv6 addresses with their prefix length, per interface.

    psutil reads them over a netlink socket, which the hardened unit forbids
    (RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX): there the list is empty
    and :func:`describe` reports the socket's own local address instead.
    """
    try:
        interfaces = psutil.net_if_addrs()
    except OSError:
        return []
    found = []
    for name, addrs in sorted(interfaces.items()):
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(addr.address.split("%")[0])
            if ip.is_loopback or (ip.version == 6 and ip.is_link_local):
                continue
            found.append({"interface": name, "address": str(ip),
                          "prefix": _prefix(addr.netmask, ip.version)})
    return found[:MAX_ADDRESSES]


def _prefix(netmask: str | None, version: int) -> int | None:
    if not netmask:
        return None
    try:
        if version == 4:
            return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
        return bin(int(ipaddress.IPv6Address(netmask))).count("1")
    except ValueError:
        return None


def firstboot_summary(path: Path | None) -> dict | None:
    """Source, address mode and refused values from firstboot.json, if there is one."""
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"error": f"{path} unreadable: {exc}"}
    if not isinstance(doc, dict):
        return {"error": f"{path} does not hold a JSON object"}
    rejected = doc.get("rejected") if isinstance(doc.get("rejected"), list) else []
    network = doc.get("network") if isinstance(doc.get("network"), dict) else {}
    return {"source": doc.get("source"), "mode": network.get("mode"),
            "rejected": rejected[:MAX_REJECTED]}


def describe(firstboot_path: Path | None, local_address: str | None = None) -> dict:
    """The ``network`` section of the self-check report sent home.

    ``local_address`` is the agent's end of its socket to home: the address the
    appliance really uses, known even where interfaces cannot be listed.
    """
    facts = {"addresses": interface_addresses(), "firstboot": firstboot_summary(firstboot_path)}
    if local_address:
        facts["local_address"] = local_address
    return facts
