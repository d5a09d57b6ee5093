"""Admin commands that must reach the running server: a Unix socket in the state dir.

No extra TCP listener: ``control.sock`` (0600, owner only) takes one JSON object
per line and answers one JSON object per line. Commands:

``{"cmd": "live"}``
    figures of the running server: listening address, sockets, TLS refusals.
``{"cmd": "config-changed", "connector": NAME}``
    push the connector's newest configuration to its connected instances.
``{"cmd": "revoked", "serial": HEX}``
    close sockets that authenticated with that certificate.
``{"cmd": "cluster-changed"}``
    a cluster policy or membership changed: re-elect directory leaders.
``{"cmd": "directories"}``
    per directory: leader instance, connected instances, last sync request.
``{"cmd": "authenticate", "directory", "username", "password"}`` /
``{"cmd": "search", "directory", "kind", "filter", "limit"}`` /
``{"cmd": "provision", "directory", "order"}``
    home's directory API (routed per cluster policy, :mod:`tether.home.directories`);
    answer ``{"ok": true, "result": {...}}`` or ``{"ok": false, "code", "error"}``.

The CLI's :func:`call` returns None when no server runs, so admin commands
work the same with home up or down (agents then get changes at next connect).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from collections.abc import Awaitable, Callable

log = logging.getLogger("tether.home.control")
MAX_LINE = 64 * 1024

Handler = Callable[[dict], Awaitable[dict]]


async def start(path: Path, handler: Handler) -> asyncio.base_events.Server:
    """Listen on ``path`` (replacing a stale socket file) with owner-only access."""
    if path.exists() or path.is_symlink():
        path.unlink()
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(lambda r, w: _serve(r, w, handler),
                                                 path=str(path), limit=MAX_LINE)
    finally:
        os.umask(old)
    path.chmod(0o600)
    return server


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: Handler) -> None:
    try:
        line = await reader.readline()
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError("need a JSON object with a cmd string")
            reply = await handler(request)
        except ValueError as exc:
            reply = {"ok": False, "error": f"bad control request: {exc}"}
        except Exception as exc:  # keep the server alive; report the failure
            log.exception("control command failed")
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        writer.write((json.dumps(reply, default=str) + "\n").encode())
        await writer.drain()
    except (ConnectionError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def call(path: Path, request: dict, timeout: float = 30.0) -> dict | None:
    """Send one command to the running server; None when it is not running."""
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # stale socket file of a stopped server
        sock.sendall((json.dumps(request) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data) if data.strip() else None
