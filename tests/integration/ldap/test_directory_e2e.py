"""The directory service end to end, real processes only (issue 5).

A real ``tether-home serve`` on 127.0.0.1, real ``tether-agent run`` processes
enrolled with image credentials, a real slapd (accesslog, syncprov, ppolicy) and
the Samba AD DC fixture. Connector configurations go through ``tether-home config
set`` (home seals ``bind_password``); everything home knows is read back through
its CLI (``export``, ``directory status``, ``authenticate``, ``provision``).
"Equal" = the export CSV rows equal the rows built from a plain ldap3 search of
the directory, entry by entry (e2erig.ldap_rows). No timing asserts: only
generous deadlines.
"""

from __future__ import annotations

import json

import ldap3
import pytest

from e2erig import GROUPS_F, USERS_F, AD_MAPPING, OPENLDAP_MAPPING, Rig, directory_entry, ldap_rows, wait_for
from ldapfix_helpers import (AD_BASE, ad_admin_connection, ad_config, ad_group, ad_user,
                             seed_ldif, slapd_config)
from ldapfix_slapd import SUFFIX

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"


@pytest.fixture
def rig_factory(tmp_path):
    made: list[Rig] = []

    def make(*connectors: str) -> Rig:
        rig = Rig.start(tmp_path / f"rig{len(made)}", connectors=connectors or ("c-a",))
        made.append(rig)
        return rig
    yield make
    for rig in made:
        rig.stop()


def expected(conn):
    return lambda: ldap_rows(conn, SUFFIX, USERS_F, GROUPS_F, OPENLDAP_MAPPING)


def corp_config(server, ca, **over) -> dict:
    return {"directories": [directory_entry("corp", slapd_config(server, ca, page_size=50, **over))]}


def leader_of(rig: Rig, directory: str = "corp"):
    row = rig.directory_status(directory)
    return row and row.get("leader")


def outcome(result) -> str:
    return next((line.split(": ", 1)[1] for line in result.stdout.splitlines()
                 if line.startswith("outcome: ")), "")


def mutate(conn, tag: str, victim: str) -> None:
    """Add, modify, rename, delete, group membership add and remove."""
    new = f"uid=e2e{tag},{PEOPLE}"
    assert conn.add(new, ["inetOrgPerson"], {"uid": f"e2e{tag}", "cn": f"E2E {tag}", "sn": "x",
                                             "mail": f"e2e{tag}@example.com"}), conn.result
    assert conn.modify(f"uid=u005,{PEOPLE}", {"mail": [(ldap3.MODIFY_REPLACE,
                                                        [f"u005-{tag}@example.com"])]}), conn.result
    assert conn.modify(f"cn=admins,{GROUPS}", {"member": [(ldap3.MODIFY_ADD, [new])]}), conn.result
    assert conn.modify_dn(f"uid=u006,{PEOPLE}", f"uid=u006{tag}"), conn.result
    assert conn.delete(f"uid={victim},{PEOPLE}"), conn.result
    assert conn.modify(f"cn=staff,{GROUPS}", {"member": [(ldap3.MODIFY_DELETE,
                                                          [f"uid=u007,{PEOPLE}"])]}), conn.result
    assert conn.add(f"cn=e2eg{tag},{GROUPS}", ["groupOfNames"],
                    {"cn": f"e2eg{tag}", "member": [new, f"uid=u006{tag},{PEOPLE}"]}), conn.result


def test_full_sync_changes_authenticate_and_provision(seeded_ldap, test_ca, rig_factory):
    """(a) full sync = directory; (b) changes reach the store; (c) authenticate, provision."""
    server, conn = seeded_ldap
    rig = rig_factory("c-a")
    agent = rig.agent("c-a")
    rig.configure(corp_config(server, test_ca))
    rows = rig.wait_store_equals("corp", expected(conn))
    assert sum(r["kind"] == "user" for r in rows) == 21 and sum(r["kind"] == "group" for r in rows) == 4
    assert len({r["id"] for r in rows}) == len(rows)
    staff = next(r for r in rows if r["dn"] == f"cn=staff,{GROUPS}")
    assert len(staff["members"].split("|")) == 20
    status = rig.directory_status("corp")
    assert status["leader"] == agent.instance_id() and status["users"] == 21
    assert status["groups"] == 4 and status["cursor"]
    # the bind password went sealed: the agent's stored configuration never holds it in clear
    assert "svc-secret" not in (agent.state / "config.json").read_text()

    mutate(conn, "1", "u019")
    rows = rig.wait_store_equals("corp", expected(conn))
    dns = {r["dn"] for r in rows}
    assert f"uid=e2e1,{PEOPLE}" in dns and f"uid=u0061,{PEOPLE}" in dns
    assert f"uid=u006,{PEOPLE}" not in dns and f"uid=u019,{PEOPLE}" not in dns

    # authenticate through the running home and the agent: nested groups as DNs
    ok = rig.authenticate("corp", "u000", "pw000")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert outcome(ok) == "success" and f"dn: uid=u000,{PEOPLE}" in ok.stdout
    groups = {line[len("group: "):] for line in ok.stdout.splitlines() if line.startswith("group: ")}
    assert groups == {f"cn={g},{GROUPS}" for g in ("staff", "admins", "nested", "outer")}
    wrong = rig.authenticate("corp", "u001", "not-the-password")
    assert wrong.returncode == 1 and outcome(wrong) == "wrong_password", wrong.stdout + wrong.stderr
    unknown = rig.authenticate("corp", "nobody-here", "pw")
    assert unknown.returncode == 1 and outcome(unknown) == "unknown_user", unknown.stdout
    expired = rig.authenticate("corp", "expired1", "pw-expired")
    assert expired.returncode == 1 and outcome(expired) == "expired", expired.stdout

    # provision: the user is created in slapd, reaches the store, and can log in
    created = rig.provision("corp", {"id": "o-1", "op": "create_user", "username": "prov1",
                                     "attributes": {"email": "prov1@example.com", "name": "Prov One"},
                                     "password": "Initial-1"})
    assert created.returncode == 0, created.stdout + created.stderr
    result = json.loads(created.stdout)["result"]
    assert result["status"] == "done" and result["dn"] == f"uid=prov1,{PEOPLE}"
    rows = rig.wait_store_equals("corp", expected(conn))
    prov = next(r for r in rows if r["dn"] == f"uid=prov1,{PEOPLE}")
    assert (prov["username"], prov["email"], prov["name"]) == ("prov1", "prov1@example.com", "Prov One")
    ok = rig.authenticate("corp", "prov1", "Initial-1")
    assert ok.returncode == 0 and outcome(ok) == "success", ok.stdout + ok.stderr
    again = rig.provision("corp", {"id": "o-2", "op": "create_user", "username": "prov1",
                                   "password": "Other-2"})
    assert again.returncode != 0 and json.loads(again.stdout)["result"]["status"] == "failed"


def test_cluster_failover_when_the_leader_agent_dies(seeded_ldap, test_ca, rig_factory):
    """(d) failover with a primary: the leader's process is killed, the other connector
    follows from home's cursor, the store equals the directory again, logins go on."""
    server, conn = seeded_ldap
    rig = rig_factory("c-a", "c-b")
    a, b = rig.start_failover(corp_config(server, test_ca), "corp", expected(conn))
    assert leader_of(rig) == a.instance_id()
    assert rig.authenticate("corp", "u002", "pw002").returncode == 0

    a.kill()  # SIGKILL by PID: the leader vanishes without a word
    wait_for(lambda: leader_of(rig) == b.instance_id(), 120, "c-b to lead corp")
    ok = rig.authenticate("corp", "u002", "pw002")
    assert ok.returncode == 0 and outcome(ok) == "success", ok.stdout + ok.stderr
    mutate(conn, "2", "u018")
    rows = rig.wait_store_equals("corp", expected(conn))
    assert f"cn=e2eg2,{GROUPS}" in {r["dn"] for r in rows}
    status = rig.directory_status("corp")
    assert status["leader"] == b.instance_id()
    assert status["applied_through"].get(b.instance_id(), 0) > 0  # c-b's changes were applied
    ok = rig.authenticate("corp", "e2e2", "x")
    assert ok.returncode == 1 and outcome(ok) == "wrong_password"  # new user, no password set
    ok = rig.authenticate("corp", "u000", "pw000")
    assert ok.returncode == 0 and f"group: cn=outer,{GROUPS}" in ok.stdout


def applied_per_instance(log_text: str, instance: str) -> int:
    """Stream messages home applied from ``instance`` (its directory_changes events)."""
    total = 0
    for line in log_text.splitlines():
        if " directory_changes " in line and f"instance={instance}" in line:
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            total += int(fields["applied"])
    return total


def test_home_down_while_the_directory_changes(seeded_ldap, test_ca, rig_factory):
    """(e) home stopped, changes in slapd, home back on the same state: the store equals
    the directory and every spooled message was applied exactly once."""
    server, conn = seeded_ldap
    rig = rig_factory("c-a")
    agent = rig.agent("c-a")
    rig.configure(corp_config(server, test_ca))
    rig.wait_store_equals("corp", expected(conn))
    iid = agent.instance_id()
    spool = agent.state / "directories" / "corp" / "spool"
    acked_before = int((spool / "acked").read_text())

    rig.home.stop()
    mutate(conn, "3", "u017")
    for i in range(10, 16):
        assert conn.modify(f"uid=u0{i},{PEOPLE}", {"cn": [(ldap3.MODIFY_REPLACE, [f"renamed {i}"])]})
    assert conn.delete(f"uid=u016,{PEOPLE}")
    assert conn.delete(f"cn=nested,{GROUPS}")
    # the agent follows on its own and keeps the changes in its spool
    wait_for(lambda: len(list(spool.glob("*.json"))) >= 3, 120, "changes spooled while home is down")
    rig.home.serve()
    rows = rig.wait_store_equals("corp", expected(conn))
    assert f"cn=nested,{GROUPS}" not in {r["dn"] for r in rows}
    assert len({r["id"] for r in rows}) == len(rows)

    def settled():
        """Spool drained, and home's applied_through, the agent's acked mark and the
        number of messages home applied (both runs, its log) all agree."""
        if list(spool.glob("*.json")):
            return None
        acked = int((spool / "acked").read_text())
        status = rig.directory_status("corp")
        applied = applied_per_instance(rig.home.log_text(), iid)
        figures = (acked, status["applied_through"].get(iid), applied)
        return (acked, status) if len(set(figures)) == 1 else None
    # exactly once: every seq 1..acked applied once over both home runs (a message
    # applied twice would keep the log's count above applied_through for good)
    acked, status = wait_for(settled, 120, "spool drained, every seq applied exactly once")
    assert acked > acked_before
    assert (status["users"], status["groups"]) == (sum(r["kind"] == "user" for r in rows),
                                                   sum(r["kind"] == "group" for r in rows))
    ok = rig.authenticate("corp", "u010", "pw010")
    assert ok.returncode == 0 and f"group: cn=outer,{GROUPS}" not in ok.stdout


def test_samba_ad_full_sync_and_nested_group_login(samba, test_ca, rig_factory):
    """(f) Samba AD DC over LDAPS: the store equals the directory (objectGUID ids,
    disabled flags, members), a change arrives, a login lists nested groups."""
    admin = ad_admin_connection(test_ca)
    users = f"CN=Users,{AD_BASE}"
    try:
        carl = ad_user(admin, "e2e-carl", "Carl-Pass-1")
        inner = ad_group(admin, "e2e-inner", [carl])
        outer = ad_group(admin, "e2e-outer", [inner])

        def want():
            return ldap_rows(admin, AD_BASE, "(&(objectCategory=person)(objectClass=user))",
                             "(objectClass=group)", AD_MAPPING, id_attr="objectGUID", ad=True)
        rig = rig_factory("c-a")
        rig.agent("c-a")
        rig.configure({"directories": [directory_entry("ad", ad_config(test_ca))]})
        rows = rig.wait_store_equals("ad", want, timeout=300)
        by_dn = {r["dn"]: r for r in rows}
        assert by_dn[carl]["disabled"] == "false" and by_dn[f"CN=Guest,{users}"]["disabled"] == "true"
        assert by_dn[outer]["members"] == inner and by_dn[carl]["member_of"] == inner

        ok = rig.authenticate("ad", "e2e-carl", "Carl-Pass-1")
        assert ok.returncode == 0 and outcome(ok) == "success", ok.stdout + ok.stderr
        groups = {line[len("group: "):].lower() for line in ok.stdout.splitlines()
                  if line.startswith("group: ")}
        assert {inner.lower(), outer.lower()} <= groups
        wrong = rig.authenticate("ad", "e2e-carl", "nope")
        assert wrong.returncode == 1 and outcome(wrong) == "wrong_password"
        unknown = rig.authenticate("ad", "e2e-nobody", "nope")
        assert unknown.returncode == 1 and outcome(unknown) == "unknown_user"

        assert admin.modify(carl, {"mail": [(ldap3.MODIFY_REPLACE, ["carl2@tether.test"])]})
        dora = ad_user(admin, "e2e-dora", "Dora-Pass-1")
        assert admin.modify(outer, {"member": [(ldap3.MODIFY_ADD, [dora])]}), admin.result
        rows = rig.wait_store_equals("ad", want, timeout=300)
        assert {r["dn"]: r for r in rows}[carl]["email"] == "carl2@tether.test"
    finally:
        admin.unbind()


def test_failover_fails_back_to_the_restarted_primary(seeded_ldap, test_ca, rig_factory):
    """Failover policy: the primary's agent stops, the other connector leads; the primary's
    agent starts again on its own state and home makes it lead again; no change is lost."""
    server, conn = seeded_ldap
    rig = rig_factory("c-a", "c-b")
    a, b = rig.start_failover(corp_config(server, test_ca), "corp", expected(conn))
    primary = a.instance_id()
    assert leader_of(rig) == primary

    a.stop()  # graceful stop by PID
    wait_for(lambda: leader_of(rig) == b.instance_id(), 120, "c-b to lead corp")
    mutate(conn, "4", "u015")
    rig.wait_store_equals("corp", expected(conn))

    a.start()  # the same state directory: same instance
    a.wait_log("socket 1 connected", 90, count=2)
    assert a.instance_id() == primary
    wait_for(lambda: leader_of(rig) == primary, 120, "the primary c-a to lead corp again")
    assert conn.modify(f"uid=u004,{PEOPLE}", {"mail": [(ldap3.MODIFY_REPLACE, ["back@example.com"])]})
    assert conn.delete(f"uid=u014,{PEOPLE}")
    rows = rig.wait_store_equals("corp", expected(conn))
    assert "back@example.com" in {r.get("email") for r in rows}
    status = rig.directory_status("corp")
    assert status["leader"] == primary
    assert status["applied_through"].get(primary, 0) > 0
    ok = rig.authenticate("corp", "u002", "pw002")
    assert ok.returncode == 0 and outcome(ok) == "success", ok.stdout + ok.stderr


def test_round_robin_spreads_logins_over_both_connectors(seeded_ldap, slapd_factory, test_ca, rig_factory):
    """Round-robin policy: home rotates `authenticate` over the connected instances.

    Which connector served a login is visible in the reply's `server`: c-a's
    configuration names the `seeded_ldap` slapd, c-b's a second slapd with the same seed.
    """
    server, conn = seeded_ldap
    other = slapd_factory("e2e-b", seed_ldif())
    rig = rig_factory("c-a", "c-b")
    set_policy = rig.cli("cluster", "set", "east", "--policy", "round-robin")
    assert set_policy.returncode == 0, set_policy.stderr
    a, b = rig.agent("c-a"), rig.agent("c-b")
    rig.configure(corp_config(server, test_ca), connectors=("c-a",))
    rig.configure(corp_config(other, test_ca), connectors=("c-b",))
    wait_for(lambda: leader_of(rig) in (a.instance_id(), b.instance_id()), 120, "a leader for corp")
    by_server = {f"localhost:{server.tls_port}": "c-a", f"localhost:{other.tls_port}": "c-b"}
    served = []
    for i in range(6):
        res = rig.cli("authenticate", "u002", "--directory", "corp", "--json", input="pw002\n")
        assert res.returncode == 0, res.stdout + res.stderr
        reply = json.loads(res.stdout)
        assert reply["outcome"] == "success"
        served.append(by_server[reply["server"]])
    assert served.count("c-a") == served.count("c-b") == 3, served
    assert all(x != y for x, y in zip(served, served[1:])), served  # strict rotation over two instances
