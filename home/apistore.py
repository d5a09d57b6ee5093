"""The HTTPS API's own database: clients, long-lived tokens, the audit log (issue 15).

A separate SQLite file (``api.sqlite3``, 0600, WAL) so the API's write rate
(one audit row per call) never contends with the agents' database, and so a
PostgreSQL home later swaps this module, not its callers. All SQL of the API
lives here.

Secrets are never stored: client secrets and long-lived tokens are 256-bit
random strings, so a plain SHA-256 of them is as strong as a slow password
hash would be (there is nothing to brute-force) and costs microseconds per
request. Revocation is a column read on every request, which is why it takes
effect at once, also when ``tether-home api-client revoke`` runs in another
process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import time
from pathlib import Path

SCOPES = ("directory:read", "directory:write", "authenticate", "status:read")
TOKEN_PREFIX = "tht_"
#: Audit rows kept; older ones are pruned (bounded disk).
MAX_AUDIT_ROWS = 1_000_000
_PRUNE_EVERY = 10_000
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    client TEXT NOT NULL REFERENCES clients(name),
    secret_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    client TEXT,
    credential TEXT,
    peer TEXT,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    op TEXT NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_client ON audit (client, seq);
"""


class ApiStoreError(ValueError):
    """An API client operation cannot be done; the text says what to do."""


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ApiStoreError(f"unknown or missing scope {', '.join(unknown) or '(none)'}; "
                            f"give --scope one or more of {', '.join(SCOPES)}")
    return sorted(set(scopes))


class ApiStore:
    """Typed access to ``api.sqlite3``."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            path.touch(mode=0o600)
            path.chmod(0o600)
        self.db = sqlite3.connect(str(path), timeout=10, isolation_level=None,
                                  check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self._inserts = 0

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ clients

    def create_client(self, name: str, scopes: list[str]) -> str:
        """Store a new client; returns its secret (shown once, stored hashed)."""
        if not _NAME_RE.match(name):
            raise ApiStoreError(f"client name {name!r} must be 1-63 characters of A-Z a-z 0-9 "
                                "_ . - starting with a letter or digit")
        scopes = check_scopes(scopes)
        secret = secrets.token_urlsafe(32)
        try:
            self.db.execute("INSERT INTO clients VALUES (?,?,?,?,NULL)",
                            (name, digest(secret), json.dumps(scopes), time.time()))
        except sqlite3.IntegrityError:
            raise ApiStoreError(f"API client {name!r} exists already; revoke it or choose "
                                "another name") from None
        return secret

    def client(self, name: str) -> dict | None:
        row = self.db.execute("SELECT * FROM clients WHERE name = ?", (name,)).fetchone()
        return _client(row) if row else None

    def clients(self) -> list[dict]:
        rows = self.db.execute("SELECT c.*, (SELECT COUNT(*) FROM tokens t WHERE t.client = "
                               "c.name AND t.revoked_at IS NULL) AS tokens FROM clients c "
                               "ORDER BY name").fetchall()
        return [{**_client(r), "tokens": r["tokens"]} for r in rows]

    def verify_client(self, name: str, secret: str) -> dict | None:
        """The active client whose secret this is, else None."""
        found = self.client(name)
        if found is None or found["revoked_at"] is not None:
            return None
        return found if hmac.compare_digest(found["secret_hash"], digest(secret)) else None

    def active_client(self, name: str) -> dict | None:
        found = self.client(name)
        return found if found and found["revoked_at"] is None else None

    def revoke_client(self, name: str) -> int:
        """Revoke a client and every token of it; returns the tokens revoked."""
        if self.client(name) is None:
            raise ApiStoreError(f"no API client {name!r}; `tether-home api-client list` "
                                "shows them")
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("UPDATE clients SET revoked_at = COALESCE(revoked_at, ?) "
                            "WHERE name = ?", (now, name))
            n = self.db.execute("UPDATE tokens SET revoked_at = ? WHERE client = ? AND "
                                "revoked_at IS NULL", (now, name)).rowcount
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return n

    # ------------------------------------------------------------ long-lived tokens

    def create_token(self, client: str) -> tuple[str, str]:
        """A long-lived bearer token for ``client``: (token_id, token shown once)."""
        if self.active_client(client) is None:
            raise ApiStoreError(f"no active API client {client!r}; create it with "
                                "`tether-home api-client create`")
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        self.db.execute("INSERT INTO tokens VALUES (?,?,?,?,NULL)",
                        (token_id, client, digest(secret), time.time()))
        return token_id, f"{TOKEN_PREFIX}{token_id}.{secret}"

    def revoke_token(self, token_id: str) -> str:
        row = self.db.execute("SELECT client FROM tokens WHERE token_id = ?",
                              (token_id,)).fetchone()
        if row is None:
            raise ApiStoreError(f"no token {token_id!r}; `tether-home api-client list --tokens` "
                                "shows them")
        self.db.execute("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) "
                        "WHERE token_id = ?", (time.time(), token_id))
        return row["client"]

    def tokens(self, client: str | None = None) -> list[dict]:
        sql, args = "SELECT token_id, client, created_at, revoked_at FROM tokens", ()
        if client:
            sql, args = sql + " WHERE client = ?", (client,)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY created_at", args)]

    def verify_token(self, token: str) -> dict | None:
        """The active client of a long-lived token (with ``token_id``), else None."""
        token_id, dot, secret = token.removeprefix(TOKEN_PREFIX).partition(".")
        if not dot or not token.startswith(TOKEN_PREFIX):
            return None
        row = self.db.execute(
            "SELECT t.secret_hash AS token_hash, c.* FROM tokens t JOIN clients c ON "
            "c.name = t.client WHERE t.token_id = ? AND t.revoked_at IS NULL AND "
            "c.revoked_at IS NULL", (token_id,)).fetchone()
        if row is None or not hmac.compare_digest(row["token_hash"], digest(secret)):
            return None
        return {**_client(row), "token_id": token_id}

    # ------------------------------------------------------------ audit

    def audit(self, *, client: str | None, credential: str | None, peer: str | None,
              method: str, path: str, op: str, status: int, outcome: str,
              detail: str | None = None) -> None:
        self.db.execute("INSERT INTO audit (at, client, credential, peer, method, path, op, "
                        "status, outcome, detail) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (time.time(), client, credential, peer, method, path[:512], op, status,
                         outcome, detail[:1024] if detail else None))
        self._inserts += 1
        if self._inserts % _PRUNE_EVERY == 0:
            self.db.execute("DELETE FROM audit WHERE seq <= (SELECT MAX(seq) FROM audit) - ?",
                            (MAX_AUDIT_ROWS,))

    def audit_rows(self, *, limit: int = 100, client: str | None = None,
                   since: float | None = None) -> list[dict]:
        """The newest ``limit`` rows (oldest first), optionally of one client / since a time."""
        sql, args = "SELECT * FROM audit WHERE 1=1", []
        if client:
            sql += " AND client = ?"
            args.append(client)
        if since is not None:
            sql += " AND at >= ?"
            args.append(since)
        rows = self.db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [dict(r) for r in reversed(rows)]


def _client(row: sqlite3.Row) -> dict:
    return {"name": row["name"], "secret_hash": row["secret_hash"],
            "scopes": json.loads(row["scopes"]), "created_at": row["created_at"],
            "revoked_at": row["revoked_at"]}
