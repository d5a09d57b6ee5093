"""The SQLite schema of ``identity.db`` and its migration (never a wipe).

Every table, index and shared statement shape of the directory store is here,
so the layout of the file is read in one place.
"""

from __future__ import annotations

import sqlite3

from tether.home.directorystore.records import decode_row, encode_record

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    directory TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, dn TEXT NOT NULL,
    attributes TEXT NOT NULL, members TEXT, disabled INTEGER, password_hashes TEXT,
    PRIMARY KEY (directory, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staging (
    directory TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, dn TEXT NOT NULL,
    attributes TEXT NOT NULL, members TEXT, disabled INTEGER, password_hashes TEXT,
    PRIMARY KEY (directory, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS directories (
    directory TEXT PRIMARY KEY,
    cursor TEXT,
    stream_mode TEXT,          -- 'full' | 'incremental' | NULL: the stream now open
    stream_instance TEXT,      -- who sent its begin (chunks of others are not mixed in)
    synced_at REAL,            -- last completed stream (full or incremental)
    full_synced_at REAL,       -- last completed full sync (snapshot swap)
    last_change REAL,          -- last batch that changed anything
    applied INTEGER NOT NULL DEFAULT 0
);
-- why a directory does not sync: the last `error` stream message (or refused `sync`
-- request); cleared by an applied `end`. Its own table so older files gain it as is.
CREATE TABLE IF NOT EXISTS directory_errors (
    directory TEXT PRIMARY KEY, instance_id TEXT, code TEXT NOT NULL, message TEXT NOT NULL,
    hint TEXT, server TEXT, at REAL, received_at REAL NOT NULL
);
-- parts of a stream message larger than a frame (tether.protocol.parts), kept until
-- its last part is applied; at most one set per (directory, instance).
CREATE TABLE IF NOT EXISTS parts (
    directory TEXT NOT NULL, instance_id TEXT NOT NULL, idx INTEGER NOT NULL,
    count INTEGER NOT NULL, size INTEGER NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (directory, instance_id, idx)
) WITHOUT ROWID;
-- membership as a relation: group id -> member (its DN's meaning, tether.dn.key, and
-- its DN as the directory spelled it, for display). The member's id is found by
-- joining entries on dn_key, so a group that arrives before its members, a rename
-- or a delete resolves by itself; a member naming nothing in the snapshot stays.
CREATE TABLE IF NOT EXISTS memberships (
    directory TEXT NOT NULL, group_id TEXT NOT NULL, member_key TEXT NOT NULL,
    member_dn TEXT NOT NULL, PRIMARY KEY (directory, group_id, member_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staging_memberships (
    directory TEXT NOT NULL, group_id TEXT NOT NULL, member_key TEXT NOT NULL,
    member_dn TEXT NOT NULL, PRIMARY KEY (directory, group_id, member_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS memberships_member ON memberships (directory, member_key);

-- lookups of home's SCIM API (home/api/scim.py): userName / displayName eq as identity
-- providers send them; case-insensitive like SCIM's caseExact=false.
CREATE INDEX IF NOT EXISTS entries_username ON entries
    (directory, kind, lower(json_extract(attributes, '$.username')));
CREATE INDEX IF NOT EXISTS entries_name ON entries
    (directory, kind, lower(json_extract(attributes, '$.name')));
-- SCIM externalId: the provisioning client's own id for an entry (RFC 7643 §3.1). The
-- directory has no place for it, so home keeps it beside the entry.
CREATE TABLE IF NOT EXISTS external_ids (
    directory TEXT NOT NULL, id TEXT NOT NULL, external_id TEXT NOT NULL,
    PRIMARY KEY (directory, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS external_ids_value ON external_ids (directory, external_id);
CREATE TABLE IF NOT EXISTS applied (
    directory TEXT NOT NULL, instance_id TEXT NOT NULL,
    applied_through INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (directory, instance_id)
);
"""

#: schema version 1 added dn_key, encodings, problems and the memberships tables
SCHEMA_VERSION = 1
MIGRATE_1 = """
ALTER TABLE entries ADD COLUMN dn_key TEXT;
ALTER TABLE entries ADD COLUMN encodings TEXT;
ALTER TABLE entries ADD COLUMN problems TEXT;
ALTER TABLE staging ADD COLUMN dn_key TEXT;
ALTER TABLE staging ADD COLUMN encodings TEXT;
ALTER TABLE staging ADD COLUMN problems TEXT;
"""
COLUMNS = ("directory, id, kind, dn, attributes, members, disabled, password_hashes, dn_key, "
           "encodings, problems")
UPSERT = {t: f"INSERT OR REPLACE INTO {t} ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
          for t in ("entries", "staging")}
#: the membership table beside each entries table (live snapshot, staging)
MEMBERS = {"entries": "memberships", "staging": "staging_memberships"}
DELETE = {t: f"DELETE FROM {t} WHERE directory = ? AND id = ?" for t in ("entries", "staging")}


def migrate(db: sqlite3.Connection) -> None:
    """Bring an older identity.db up to SCHEMA_VERSION in place (never a wipe).

    Version 0 -> 1: entries gain dn_key (computed from each DN), encodings and
    problems; memberships are filled from each group's stored member DNs.
    """
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = {r[1] for r in db.execute("PRAGMA table_info(entries)")}
        if "dn_key" not in columns:
            for statement in filter(str.strip, MIGRATE_1.split(";")):
                db.execute(statement)
        for table in ("entries", "staging"):
            rows = db.execute(f"SELECT * FROM {table}").fetchall()
            for row in rows:
                record = decode_row(row)
                record["problems"] = None
                entry, member_rows = encode_record(row["directory"], record)
                db.execute(UPSERT[table], entry)
                db.execute(f"DELETE FROM {MEMBERS[table]} WHERE directory = ? AND "
                           "group_id = ?", (row["directory"], row["id"]))
                db.executemany(f"INSERT OR REPLACE INTO {MEMBERS[table]} VALUES "
                               "(?,?,?,?)", member_rows)
        db.execute("CREATE INDEX IF NOT EXISTS entries_dn_key ON entries "
                   "(directory, dn_key)")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
