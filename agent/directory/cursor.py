"""The resumable sync cursor: an opaque string home stores per directory.

Why opaque and versioned: home must not interpret it, and a cursor from an
older agent or another directory kind must be refused clearly (which makes
the engine fall back to a full resync) rather than misread.
"""

from __future__ import annotations

import base64
import json

from .errors import CursorExpired

PREFIX = "tc1:"


def encode(kind: str, **position) -> str:
    body = json.dumps({"kind": kind, **position}, sort_keys=True, separators=(",", ":"))
    return PREFIX + base64.urlsafe_b64encode(body.encode()).decode()


def decode(cursor: str, kind: str) -> dict:
    """The position inside a cursor of `kind`; CursorExpired when it is not one."""
    if not isinstance(cursor, str) or not cursor.startswith(PREFIX):
        raise CursorExpired(f"cursor {str(cursor)[:40]!r} is not a tether cursor")
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor[len(PREFIX):].encode()))
    except ValueError:
        raise CursorExpired("cursor is damaged") from None
    if data.get("kind") != kind:
        raise CursorExpired(f"cursor is for {data.get('kind')!r}, this directory needs {kind!r}")
    return data
