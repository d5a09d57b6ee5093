"""Logging to journald with structured fields, or to stderr with levels.

journald's native protocol is a datagram of ``FIELD=value`` lines to
``/run/systemd/journal/socket`` (values with newlines use the length-prefixed
form). The agent speaks it directly — python3-systemd's JournalHandler lives in
the Debian package, not in the agent's venv — so every record carries
``PRIORITY``, ``SYSLOG_IDENTIFIER``, ``CODE_*`` and the ``extra={"tether_*": ...}``
fields (upper-cased: ``TETHER_URL=...``) that ``journalctl -o json`` shows and
filters on. Without the socket (tests, ``selfcheck`` in a shell) records go to
stderr as ``LEVEL logger: message key=value``.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "tether-agent"
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
             logging.ERROR: 3, logging.CRITICAL: 2}


def _extra_fields(record: logging.LogRecord) -> dict[str, str]:
    return {k.upper(): str(v) for k, v in record.__dict__.items() if k.startswith("tether_")}


def encode_entry(fields: dict[str, str]) -> bytes:
    """journald native format; binary-safe form for values containing newlines."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Send each record as one journal entry with structured fields."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": IDENTIFIER,
                "LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
                **_extra_fields(record),
            }
            self.sock.sendto(encode_entry(fields), self.path)
        except Exception:  # noqa: BLE001 - logging must never kill the agent
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


class KeyValueFormatter(logging.Formatter):
    """``LEVEL logger: message key=value ...`` for stderr."""

    def format(self, record: logging.LogRecord) -> str:
        base = f"{record.levelname} {record.name}: {record.getMessage()}"
        extra = " ".join(f"{k.lower()}={v}" for k, v in _extra_fields(record).items())
        text = f"{base} {extra}" if extra else base
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(level: int = logging.INFO, force_stderr: bool = False) -> str:
    """Route the root logger to journald when reachable, else stderr; say which."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    use_journal = (not force_stderr and os.environ.get("JOURNAL_STREAM") is not None
                   and os.path.exists(JOURNAL_SOCKET))
    handler: logging.Handler = (JournalHandler() if use_journal
                                else logging.StreamHandler(sys.stderr))
    if not use_journal:
        handler.setFormatter(KeyValueFormatter())
    root.addHandler(handler)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    return "journald" if use_journal else "stderr"
