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
Anything else that goes wrong on the way (a request above :data:`MAX_LINE`, no
answer in time, home stopping mid-call) raises :class:`ControlError` with a
sentence that says so: "home is not running" is said only when it is true.

A connection that sends no complete request within :data:`IDLE_SECONDS` is closed.
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
#: Seconds a client has to send its request line (the CLI sends it at once).
IDLE_SECONDS = 5.0


class ControlError(ValueError):
    """The running server could not be asked or did not answer; the text says why."""

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
        try:
            line = await asyncio.wait_for(reader.readline(), IDLE_SECONDS)
        except TimeoutError:
            log.info("control connection closed: no request within %.0f s", IDLE_SECONDS)
            return
        except (ValueError, asyncio.LimitOverrunError):  # readline: line above the limit
            writer.write((json.dumps({"ok": False, "error": f"control request above "
                                      f"{MAX_LINE // 1024} KiB; send a smaller one"}) +
                          "\n").encode())
            await writer.drain()
            return
        if not line.endswith(b"\n"):
            return  # the client went away before finishing its request
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
    """Send one command to the running server; None when it is not running.

    Raises :class:`ControlError` when the request is too large, the server does
    not answer within ``timeout`` or closes the connection without an answer.
    """
    line = (json.dumps(request) + "\n").encode()
    if len(line) > MAX_LINE:
        raise ControlError(f"the request to the running home is {len(line) // 1024} KiB, "
                           f"above the control socket's {MAX_LINE // 1024} KiB; make it "
                           "smaller")
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # stale socket file of a stopped server
        data = b""
        try:
            sock.sendall(line)
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ControlError(f"home did not answer within {timeout:.0f} s (it may still "
                               "finish the command); see home's log") from None
        except (ConnectionResetError, BrokenPipeError):
            data = b""
    if not data.endswith(b"\n"):
        raise ControlError("home closed the control connection without answering (it "
                           "stopped or crashed during the command); check `tether-home "
                           "status` and home's log")
    try:
        return json.loads(data)
    except ValueError:
        raise ControlError("home's answer on the control socket is not JSON; see home's "
                           "log") from None
