"""The agent process's own listening sockets, as home's proof of "no inbound".

psutil lists this process's inet sockets; TCP sockets in LISTEN state and UDP
sockets bound without a peer are what would accept inbound traffic. The agent
is built never to have any, and reports the (expected empty) list in hello,
heartbeats and status, so home shows it and a regression is visible.
"""

from __future__ import annotations

import socket

import psutil


def listening_sockets(pid: int | None = None) -> list[dict]:
    """``[{"proto", "address", "port"}]`` for every listening socket of ``pid``."""
    proc = psutil.Process(pid)
    try:
        conns = proc.net_connections(kind="inet")
    except psutil.AccessDenied:
        return [{"proto": "unknown", "address": "access denied", "port": 0}]
    found = []
    for conn in conns:
        tcp = conn.type == socket.SOCK_STREAM and conn.status == psutil.CONN_LISTEN
        udp = conn.type == socket.SOCK_DGRAM and not conn.raddr and conn.laddr
        if tcp or udp:
            found.append({"proto": "tcp" if tcp else "udp",
                          "address": conn.laddr.ip, "port": conn.laddr.port})
    return sorted(found, key=lambda s: (s["proto"], s["address"], s["port"]))
