"""Where home keeps its state: one directory, every file named here.

Everything that identifies a home (CA key, config-signing key, database)
lives under one state directory so that backup, restore and tests are a
matter of one path (``--state``, env ``TETHER_HOME_STATE``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE = "/var/lib/tether-home"
STATE_ENV = "TETHER_HOME_STATE"


class StateError(RuntimeError):
    """The state directory is missing, incomplete or unusable."""


@dataclass(frozen=True)
class StatePaths:
    """Paths of every file in a home state directory."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "home.sqlite3"

    @property
    def identity_db(self) -> Path:
        """Synced users and groups (issue 5): separate from the control database."""
        return self.root / "identity.db"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def config_key(self) -> Path:
        return self.root / "config-signing.key"

    @property
    def config_pub(self) -> Path:
        return self.root / "config-signing.pub"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def api_db(self) -> Path:
        """API clients, their token hashes and the audit log (issue 15)."""
        return self.root / "api.sqlite3"

    @property
    def api_cert(self) -> Path:
        """The HTTPS API's certificate (replace it and api.key with a public CA's)."""
        return self.root / "api.crt"

    @property
    def api_key(self) -> Path:
        return self.root / "api.key"

    @property
    def api_signing_key(self) -> Path:
        """Signs the API's JWT access tokens (RFC 9068); made on first use."""
        return self.root / "api-jwt.key"

    def require_initialized(self) -> StatePaths:
        """Fail with the command to run when ``init`` has not been done here."""
        missing = [p.name for p in (self.db, self.ca_key, self.ca_cert, self.server_key,
                                    self.server_cert, self.config_key) if not p.exists()]
        if missing:
            raise StateError(f"{self.root} is not an initialized home state directory "
                             f"(missing {', '.join(missing)}); run "
                             f"`tether-home init --state {self.root} --name <host name>`")
        return self


def resolve_state(value: str | None) -> StatePaths:
    """--state, else $TETHER_HOME_STATE, else /var/lib/tether-home."""
    return StatePaths(Path(value or os.environ.get(STATE_ENV) or DEFAULT_STATE).resolve())


def write_private(path: Path, data: bytes) -> None:
    """Create a secret file readable by the owner only (0600 from the first byte)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_public(path: Path, data: bytes) -> None:
    """Write a non-secret file (certificates), 0644."""
    path.write_bytes(data)
    path.chmod(0o644)
