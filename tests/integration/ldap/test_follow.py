"""The Follower: notifications drive incremental syncs into the spool; a restart resumes from the cursor."""

from __future__ import annotations

import time

import ldap3

from ldapfix_slapd import SUFFIX
from tether.agent.directory import DirectoryService, Spool
from tether.agent.directory.follow import Follower

WAIT = 15  # upper bound on a loaded machine, not a speed assertion


def spooled_changes(spool: Spool) -> list[dict]:
    return [c for _, m in spool.pending() if m["type"] == "chunk" for c in m["changes"]]


def wait_until(predicate) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_changes_follow_into_the_spool_and_restart_resumes(ldap_raw, ldap_admin, tmp_path):
    spool = Spool(tmp_path / "spool")
    follower = Follower(DirectoryService(ldap_raw), spool, tmp_path / "state", interval=3600)
    follower.start()
    try:
        wait_until(lambda: any(m["type"] == "end" for _, m in spool.pending()))
        first = [m for _, m in spool.pending()]
        assert first[0]["mode"] == "full"
        dn = f"uid=u004,ou=people,{SUFFIX}"
        assert ldap_admin.modify(dn, {"mail": [(ldap3.MODIFY_REPLACE, ["followed@example.com"])]})
        wait_until(lambda: any(c.get("attributes", {}).get("email") == "followed@example.com"
                               for c in spooled_changes(spool)))
    finally:
        follower.stop()
    # agent restart: a new follower resumes from the stored cursor (incremental, not full)
    spool.ack(spool.pending()[-1][0])
    assert ldap_admin.modify(dn, {"mail": [(ldap3.MODIFY_REPLACE, ["after-restart@example.com"])]})
    again = Follower(DirectoryService(ldap_raw), Spool(tmp_path / "spool"), tmp_path / "state")
    again.run_once()
    msgs = [m for _, m in spool.pending()]
    assert msgs[0]["mode"] == "incremental"
    assert [c["attributes"]["email"] for c in spooled_changes(spool)] == ["after-restart@example.com"]
