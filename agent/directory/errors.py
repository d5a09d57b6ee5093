"""Errors the directory engine reports to home.

Why one module: home shows these to an operator, so every failure carries a
stable machine code, a sentence saying what went wrong, and what to do next.
The agent keeps serving other directories after any of them.
"""

from __future__ import annotations

CODES = {
    "config": "fix the directory configuration in home",
    "bind_failed": "check the bind DN and password configured for this directory",
    "server_down": "check that the directory servers are running and reachable from the appliance",
    "tls": "check the CA file and that the server certificate names the configured host",
    "bad_filter": "correct the LDAP filter syntax in the directory configuration",
    "missing_attribute": "map only attributes that the directory schema defines",
    "size_limit": "raise the server's size limit for the bind account or narrow the base DN / filter",
    "cursor_expired": "a full resync is required; the engine starts one by itself",
    "operation_failed": "see the server's reason",
    "too_large": "the entry is larger than a change message may carry (32 MiB); split the group "
                 "in the directory or leave it out of the group filter",
}


class DirectoryError(Exception):
    """A failure with a stable `code`, a human `message` and the `server` involved."""

    def __init__(self, code: str, message: str, server: str | None = None, reason: str | None = None):
        if code not in CODES:
            raise ValueError(f"unknown directory error code {code!r}")
        self.code, self.message, self.server, self.reason = code, message, server, reason
        super().__init__(f"{code}: {message}" + (f" ({server})" if server else ""))

    @property
    def hint(self) -> str:
        return CODES[self.code]

    def to_dict(self) -> dict:
        """Plain form for the wire: code, message, hint, and where known server/reason."""
        out = {"code": self.code, "message": self.message, "hint": self.hint}
        if self.server:
            out["server"] = self.server
        if self.reason:
            out["reason"] = self.reason
        return out


class DirectoryConfigError(DirectoryError):
    """The configuration dict is invalid; raised before any connection is made."""

    def __init__(self, message: str):
        super().__init__("config", message)


class CursorExpired(DirectoryError):
    """The server no longer has the changes since the cursor: a full resync is needed."""

    def __init__(self, message: str, server: str | None = None):
        super().__init__("cursor_expired", message, server)
