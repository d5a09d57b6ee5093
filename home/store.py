"""Home's database: one SQLite file in the state directory.

SQLite in WAL mode lets the admin CLI read and write while ``serve`` runs (the
one-process server owns the sockets, the CLI only touches rows). All SQL about
connectors, certificates, images, instances, configurations and sockets lives here
so the rest of home speaks in plain Python values; :class:`Store` implements the
narrow interfaces of :mod:`tether.home.stores` that home's parts are typed against.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from tether.home import sqlite as sqlite_helpers
from tether.home.sqlite import Transaction

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS connectors (
    name TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    max_instances INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS certs (
    serial TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('server', 'image', 'instance')),
    subject TEXT NOT NULL,
    connector TEXT,
    image_id TEXT,
    instance_id TEXT,
    not_before REAL NOT NULL,
    not_after REAL NOT NULL,
    revoked_at REAL,
    revoke_reason TEXT
);
CREATE TABLE IF NOT EXISTS images (
    image_id TEXT PRIMARY KEY,
    connector TEXT NOT NULL REFERENCES connectors(name),
    fingerprint TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    home_urls TEXT NOT NULL,
    issued_at REAL NOT NULL,
    max_instances INTEGER
);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    image_id TEXT NOT NULL REFERENCES images(image_id),
    connector TEXT NOT NULL,
    machine_fingerprint TEXT NOT NULL,
    machine TEXT NOT NULL,
    sealing_public_key TEXT NOT NULL,
    cert_serial TEXT,
    cert_not_after REAL,
    enrolled_at REAL NOT NULL,
    last_seen REAL,
    agent_version TEXT,
    selfcheck TEXT,
    listening TEXT,
    config_version INTEGER,
    config_status TEXT,
    config_confirmed INTEGER,
    UNIQUE (image_id, machine_fingerprint)
);
CREATE TABLE IF NOT EXISTS clones (
    image_id TEXT NOT NULL,
    connector TEXT NOT NULL,
    machine_fingerprint TEXT NOT NULL,
    machine TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    attempts INTEGER NOT NULL,
    PRIMARY KEY (image_id, machine_fingerprint)
);
CREATE TABLE IF NOT EXISTS configs (
    connector TEXT NOT NULL REFERENCES connectors(name),
    version INTEGER NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (connector, version)
);
CREATE TABLE IF NOT EXISTS sockets (
    socket_id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    connector TEXT NOT NULL,
    image_id TEXT,
    instance_id TEXT,
    peer TEXT NOT NULL,
    socket_index INTEGER,
    connected_at REAL NOT NULL
);
"""


#: Per-cluster routing policy (issue 5); added by :meth:`Store.migrate` to older databases.
_CLUSTERS = """
CREATE TABLE IF NOT EXISTS clusters (
    name TEXT PRIMARY KEY,
    policy TEXT NOT NULL CHECK (policy IN ('failover', 'round-robin')),
    primary_connector TEXT,
    updated_at REAL NOT NULL
)"""
CLUSTER_POLICIES = ("failover", "round-robin")

#: Columns added after the first release, per table (issue 11: enrolment that proves
#: possession). :meth:`Store.migrate` adds the ones a database lacks.
_ADDED_COLUMNS = {
    "images": {"max_instances": "INTEGER"},
    # key_spki: PEM of the instance's current public key (the one its certificate
    # certifies); re-keying needs a proof signed by it. reset_at: the operator reset
    # the instance; its machine's next enrolment is accepted with any key.
    "instances": {"key_spki": "TEXT", "reset_at": "REAL", "config_confirmed": "INTEGER"},
    # reason: why the enrolment was refused (limit | machine_enrolled); instance_id:
    # the enrolled instance whose machine fingerprint the refused request named.
    "clones": {"reason": "TEXT", "instance_id": "TEXT"},
}
#: Clone rows are aggregated per (image, machine); beyond this many distinct machines
#: per image the rest count on one row under this fingerprint.
OTHER_MACHINES = "(other machines)"


class StoreError(RuntimeError):
    """A database operation failed for a reason the operator can fix."""


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _unjson(text: str | None) -> Any:
    return None if text is None else json.loads(text)


#: What to do about a home.sqlite3 that cannot be used.
RESTORE_HINT = ("stop home and restore home.sqlite3 from a backup of the state directory "
                "(it holds the certificates, instances and configurations: without it no "
                "agent is recognised)")


class Store:
    """Typed access to home's SQLite database."""

    def __init__(self, path: Path, *, _new: bool = False) -> None:
        self.path = path
        if not _new and not path.exists():
            raise sqlite_helpers.DatabaseUnusable(f"{path} is missing; {RESTORE_HINT}")
        self.db = sqlite_helpers.connect(path, timeout=10, hint=RESTORE_HINT, existing=not _new)
        try:
            self.db.execute("PRAGMA foreign_keys=ON")
            if not _new and self.db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name IN "
                    "('meta', 'certs', 'images', 'instances')").fetchone() is None:
                raise sqlite_helpers.DatabaseUnusable(
                    f"{path} is an SQLite file without home's tables; {RESTORE_HINT}")
            self.migrate()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise sqlite_helpers.DatabaseUnusable(f"{path} cannot be read ({exc}); "
                                                  f"{RESTORE_HINT}") from None
        except sqlite_helpers.DatabaseUnusable:
            self.db.close()
            raise

    def check(self) -> None:
        """Refuse a damaged database (``serve`` calls this once at start)."""
        sqlite_helpers.quick_check(self.db, self.path, RESTORE_HINT)

    @classmethod
    def create(cls, path: Path) -> Store:
        """Create the schema (idempotent) with the file owner-only (it holds secrets)."""
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        store = cls(path, _new=True)
        store.db.executescript(_SCHEMA)
        store.migrate()
        store.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
        return store

    def migrate(self) -> None:
        """Bring a database made by an older home up to this schema (idempotent)."""
        for table, added in _ADDED_COLUMNS.items():
            columns = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for name, kind in added.items():
                if columns and name not in columns:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        self.db.execute(_CLUSTERS)

    def close(self) -> None:
        self.db.close()

    def _one(self, sql: str, args: Iterable = ()) -> dict | None:
        row = self.db.execute(sql, tuple(args)).fetchone()
        return dict(row) if row else None

    def _all(self, sql: str, args: Iterable = ()) -> list[dict]:
        return [dict(r) for r in self.db.execute(sql, tuple(args)).fetchall()]

    # ------------------------------------------------------------ connectors

    def add_connector(self, name: str, cluster: str, max_instances: int) -> None:
        try:
            self.db.execute("INSERT INTO connectors VALUES (?, ?, ?, ?)",
                            (name, cluster, max_instances, time.time()))
        except sqlite3.IntegrityError:
            raise StoreError(f"connector {name!r} exists already; "
                             "`tether-home status` lists connectors") from None

    def update_connector(self, name: str, cluster: str | None,
                         max_instances: int | None) -> None:
        self.connector(name)
        if cluster is not None:
            self.db.execute("UPDATE connectors SET cluster = ? WHERE name = ?", (cluster, name))
        if max_instances is not None:
            self.db.execute("UPDATE connectors SET max_instances = ? WHERE name = ?",
                            (max_instances, name))

    def connector(self, name: str) -> dict:
        row = self._one("SELECT * FROM connectors WHERE name = ?", (name,))
        if row is None:
            raise StoreError(f"no connector {name!r}; create it with "
                             f"`tether-home connector create {name}`")
        return row

    def connectors(self) -> list[dict]:
        return self._all("SELECT * FROM connectors ORDER BY name")

    # -------------------------------------------------------------- clusters

    def set_cluster_policy(self, name: str, policy: str, primary: str | None) -> dict:
        """Store a cluster's routing policy; ``primary`` must be one of its connectors."""
        if policy not in CLUSTER_POLICIES:
            raise StoreError(f"policy {policy!r}: use failover or round-robin")
        members = [c["name"] for c in self.connectors() if c["cluster"] == name]
        if not members:
            raise StoreError(f"no connector is in cluster {name!r}; put one there with "
                             f"`tether-home connector set NAME --cluster {name}`")
        if primary is not None and primary not in members:
            raise StoreError(f"connector {primary!r} is not in cluster {name!r} "
                             f"(its connectors: {', '.join(members)})")
        self.db.execute("INSERT INTO clusters VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE "
                        "SET policy = excluded.policy, primary_connector = "
                        "excluded.primary_connector, updated_at = excluded.updated_at",
                        (name, policy, primary, time.time()))
        return self.cluster_policy(name)

    def cluster_policy(self, name: str) -> dict:
        """The effective policy: the stored one, else failover with the alphabetically
        first connector of the cluster as primary. A stored primary that left the
        cluster falls back to that default primary too."""
        members = [c["name"] for c in self.connectors() if c["cluster"] == name]
        row = self._one("SELECT * FROM clusters WHERE name = ?", (name,))
        policy = row["policy"] if row else "failover"
        primary = row["primary_connector"] if row else None
        if primary not in members:
            primary = members[0] if members else None
        return {"name": name, "policy": policy, "primary": primary, "connectors": members,
                "configured": row is not None}

    def clusters(self) -> list[dict]:
        """Every cluster named by a connector or a stored policy, with its effective policy."""
        names = {c["cluster"] for c in self.connectors()}
        names.update(r[0] for r in self.db.execute("SELECT name FROM clusters"))
        return [self.cluster_policy(n) for n in sorted(names)]

    # ----------------------------------------------------------------- certs

    def add_cert(self, serial: str, kind: str, subject: str, not_before: float,
                 not_after: float, *, connector: str | None = None, image_id: str | None = None,
                 instance_id: str | None = None) -> None:
        self.db.execute("INSERT INTO certs (serial, kind, subject, connector, image_id, "
                        "instance_id, not_before, not_after) VALUES (?,?,?,?,?,?,?,?)",
                        (serial, kind, subject, connector, image_id, instance_id, not_before,
                         not_after))

    def cert(self, serial: str) -> dict | None:
        return self._one("SELECT * FROM certs WHERE serial = ?", (serial.lower(),))

    def revoke_cert(self, serial: str, reason: str) -> dict:
        row = self.cert(serial)
        if row is None:
            raise StoreError(f"no certificate with serial {serial}; `tether-home status --json` "
                             "shows image and instance serials")
        if row["revoked_at"] is None:
            self.db.execute("UPDATE certs SET revoked_at = ?, revoke_reason = ? WHERE serial = ?",
                            (time.time(), reason, row["serial"]))
        return self.cert(serial)

    def valid_instance_certs(self, instance_id: str, now: float | None = None) -> list[dict]:
        """An instance's certificates that are neither revoked nor expired."""
        now = time.time() if now is None else now
        return self._all("SELECT * FROM certs WHERE kind = 'instance' AND instance_id = ? "
                         "AND revoked_at IS NULL AND not_after > ? ORDER BY not_before",
                         (instance_id, now))

    def revoke_instance_certs(self, instance_id: str, keep: Iterable[str],
                              reason: str) -> list[str]:
        """Revoke every unrevoked certificate of an instance except ``keep``; their serials."""
        keep = sorted(set(keep))
        marks = ",".join("?" * len(keep))
        clause = f" AND serial NOT IN ({marks})" if keep else ""
        args = (instance_id, *keep)
        serials = [r[0] for r in self.db.execute(
            "SELECT serial FROM certs WHERE kind = 'instance' AND instance_id = ? "
            f"AND revoked_at IS NULL{clause}", args)]
        if serials:
            self.db.execute("UPDATE certs SET revoked_at = ?, revoke_reason = ? "
                            "WHERE kind = 'instance' AND instance_id = ? "
                            f"AND revoked_at IS NULL{clause}", (time.time(), reason, *args))
        return serials

    def certs(self, **where: Any) -> list[dict]:
        clause = " AND ".join(f"{k} = ?" for k in where) or "1"
        return self._all(f"SELECT * FROM certs WHERE {clause} ORDER BY not_before",
                         where.values())

    # ---------------------------------------------------------------- images

    def add_image(self, image_id: str, connector: str, fingerprint: str, cert_serial: str,
                  home_urls: list[str], max_instances: int | None = None) -> None:
        self.db.execute("INSERT INTO images (image_id, connector, fingerprint, cert_serial, "
                        "home_urls, issued_at, max_instances) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (image_id, connector, fingerprint, cert_serial, json.dumps(home_urls),
                         time.time(), max_instances))

    def image(self, image_id: str) -> dict | None:
        row = self._one("SELECT * FROM images WHERE image_id = ?", (image_id,))
        if row:
            row["home_urls"] = json.loads(row["home_urls"])
        return row

    def images(self) -> list[dict]:
        rows = self._all("SELECT * FROM images ORDER BY issued_at")
        for row in rows:
            row["home_urls"] = json.loads(row["home_urls"])
        return rows

    # ------------------------------------------------------------- instances

    def instance(self, instance_id: str) -> dict | None:
        return self._decode_instance(self._one(
            "SELECT * FROM instances WHERE instance_id = ?", (instance_id,)))

    def instance_for_machine(self, image_id: str, fingerprint: str) -> dict | None:
        return self._decode_instance(self._one(
            "SELECT * FROM instances WHERE image_id = ? AND machine_fingerprint = ?",
            (image_id, fingerprint)))

    def count_instances(self, image_id: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM instances WHERE image_id = ?",
                               (image_id,)).fetchone()[0]

    def instances(self, connector: str | None = None) -> list[dict]:
        if connector:
            rows = self._all("SELECT * FROM instances WHERE connector = ? ORDER BY enrolled_at",
                             (connector,))
        else:
            rows = self._all("SELECT * FROM instances ORDER BY enrolled_at")
        return [self._decode_instance(r) for r in rows]

    @staticmethod
    def _decode_instance(row: dict | None) -> dict | None:
        if row is not None:
            for key in ("machine", "selfcheck", "listening"):
                row[key] = _unjson(row[key])
        return row

    def add_instance(self, instance_id: str, image_id: str, connector: str, fingerprint: str,
                     machine: dict, sealing_public_key: str, key_spki: str | None = None) -> None:
        self.db.execute("INSERT INTO instances (instance_id, image_id, connector, "
                        "machine_fingerprint, machine, sealing_public_key, enrolled_at, "
                        "key_spki) VALUES (?,?,?,?,?,?,?,?)",
                        (instance_id, image_id, connector, fingerprint, _json(machine),
                         sealing_public_key, time.time(), key_spki))

    def reenroll_instance(self, instance_id: str, machine: dict, sealing_public_key: str,
                          key_spki: str | None = None) -> None:
        """New keys for an enrolled instance (it proved possession, or it was reset).

        What home delivered before was sealed to the old sealing key: the delivery
        state is cleared so the next hello gets the configuration pushed again.
        """
        self.db.execute("UPDATE instances SET machine = ?, sealing_public_key = ?, "
                        "enrolled_at = ?, key_spki = ?, reset_at = NULL, "
                        "config_version = NULL, config_status = NULL, config_confirmed = NULL "
                        "WHERE instance_id = ?",
                        (_json(machine), sealing_public_key, time.time(), key_spki,
                         instance_id))

    def set_instance_key(self, instance_id: str, key_spki: str) -> None:
        """Record the instance's current public key (renewal, or a pre-issue-11 row)."""
        self.db.execute("UPDATE instances SET key_spki = ? WHERE instance_id = ?",
                        (key_spki, instance_id))

    def reset_instance(self, instance_id: str) -> None:
        """Forget the instance's key: its machine's next enrolment is accepted afresh."""
        self.db.execute("UPDATE instances SET key_spki = NULL, reset_at = ? "
                        "WHERE instance_id = ?", (time.time(), instance_id))

    def set_instance_cert(self, instance_id: str, serial: str, not_after: float) -> None:
        self.db.execute("UPDATE instances SET cert_serial = ?, cert_not_after = ? "
                        "WHERE instance_id = ?", (serial, not_after, instance_id))

    def record_hello(self, instance_id: str, agent_version: str, selfcheck: dict | None,
                     listening: list | None, config_version: int | None) -> None:
        self.db.execute("UPDATE instances SET last_seen = ?, agent_version = ?, "
                        "selfcheck = COALESCE(?, selfcheck), listening = COALESCE(?, listening),"
                        " config_version = COALESCE(?, config_version) WHERE instance_id = ?",
                        (time.time(), agent_version, _json(selfcheck), _json(listening),
                         config_version, instance_id))

    def record_heartbeats(self, beats: dict[str, dict]) -> None:
        """Write a batch of heartbeats in one transaction (cheap at thousands of agents)."""
        if not beats:
            return
        with self.transaction():
            self.db.executemany(
                "UPDATE instances SET last_seen = ?, selfcheck = COALESCE(?, selfcheck), "
                "listening = COALESCE(?, listening), agent_version = COALESCE(?, "
                "agent_version), config_version = COALESCE(?, config_version) "
                "WHERE instance_id = ?",
                [(b["at"], _json(b.get("selfcheck")), _json(b.get("listening")),
                  b.get("agent_version"), b.get("config_version"), iid)
                 for iid, b in beats.items()])

    def record_config_state(self, instance_id: str, version: int | None, status: str) -> None:
        """What the agent reports it runs (for ``status``); never what home trusts."""
        self.db.execute("UPDATE instances SET config_version = COALESCE(?, config_version), "
                        "config_status = ? WHERE instance_id = ?", (version, status, instance_id))

    def confirm_config(self, instance_id: str, version: int) -> None:
        """Home pushed ``version`` to this instance and it answered "applied": the only
        way ``config_confirmed`` changes (an agent's hello or ack never sets it)."""
        self.db.execute("UPDATE instances SET config_confirmed = ?, config_version = ?, "
                        "config_status = 'applied' WHERE instance_id = ?",
                        (version, version, instance_id))

    # ---------------------------------------------------------------- clones

    def record_clone(self, image_id: str, connector: str, fingerprint: str, machine: dict,
                     *, reason: str = "limit", instance_id: str | None = None,
                     max_rows: int = 100) -> str:
        """Count a refused enrolment on its (image, machine) row; returns the row's
        fingerprint. At most ``max_rows`` machines per image get a row of their own
        (plus one for :data:`OTHER_MACHINES`), so refusals never grow the table
        without bound."""
        now = time.time()
        with self.transaction():
            known = self.db.execute("SELECT 1 FROM clones WHERE image_id = ? AND "
                                    "machine_fingerprint = ?", (image_id, fingerprint)).fetchone()
            if known is None and self.db.execute(
                    "SELECT COUNT(*) FROM clones WHERE image_id = ? AND machine_fingerprint "
                    "!= ?", (image_id, OTHER_MACHINES)).fetchone()[0] >= max_rows:
                fingerprint, machine, instance_id = OTHER_MACHINES, {}, None
            self.db.execute(
                "INSERT INTO clones (image_id, connector, machine_fingerprint, machine, "
                "first_seen, last_seen, attempts, reason, instance_id) VALUES (?,?,?,?,?,?,1,?,?) "
                "ON CONFLICT (image_id, machine_fingerprint) DO UPDATE SET "
                "last_seen = excluded.last_seen, attempts = attempts + 1, "
                "machine = excluded.machine, reason = excluded.reason, "
                "instance_id = excluded.instance_id",
                (image_id, connector, fingerprint, _json(machine), now, now, reason, instance_id))
        return fingerprint

    def count_clones(self, image_id: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM clones WHERE image_id = ?",
                               (image_id,)).fetchone()[0]

    def clones(self) -> list[dict]:
        rows = self._all("SELECT * FROM clones ORDER BY first_seen")
        for row in rows:
            row["machine"] = _unjson(row["machine"])
        return rows

    # --------------------------------------------------------------- configs

    def add_config(self, connector: str, config: dict) -> int:
        """Store a new version of a connector's configuration; returns its number."""
        self.connector(connector)
        with self.transaction():
            current = self.db.execute("SELECT MAX(version) FROM configs WHERE connector = ?",
                                      (connector,)).fetchone()[0] or 0
            self.db.execute("INSERT INTO configs VALUES (?, ?, ?, ?)",
                            (connector, current + 1, json.dumps(config), time.time()))
        return current + 1

    def config(self, connector: str, version: int | None = None) -> dict | None:
        if version is None:
            row = self._one("SELECT * FROM configs WHERE connector = ? "
                            "ORDER BY version DESC LIMIT 1", (connector,))
        else:
            row = self._one("SELECT * FROM configs WHERE connector = ? AND version = ?",
                            (connector, version))
        if row:
            row["config"] = json.loads(row["config"])
        return row

    def config_versions(self, connector: str) -> list[int]:
        return [r[0] for r in self.db.execute(
            "SELECT version FROM configs WHERE connector = ? ORDER BY version", (connector,))]

    # --------------------------------------------------------------- sockets

    def clear_sockets(self) -> None:
        """At server start: rows left by a crashed server describe nothing."""
        self.db.execute("DELETE FROM sockets")

    def add_socket(self, socket_id: str, role: str, connector: str, image_id: str | None,
                   instance_id: str | None, peer: str, socket_index: int | None) -> None:
        self.db.execute("INSERT OR REPLACE INTO sockets VALUES (?,?,?,?,?,?,?,?)",
                        (socket_id, role, connector, image_id, instance_id, peer, socket_index,
                         time.time()))

    def remove_socket(self, socket_id: str) -> None:
        self.db.execute("DELETE FROM sockets WHERE socket_id = ?", (socket_id,))

    def sockets(self) -> list[dict]:
        return self._all("SELECT * FROM sockets ORDER BY connected_at")

    # ------------------------------------------------------------------ misc

    def transaction(self):
        """``with store.transaction():`` — BEGIN IMMEDIATE ... COMMIT/ROLLBACK."""
        return Transaction(self.db)
