"""The DirectoryService facade (the agent's call boundary) against a real slapd."""

from __future__ import annotations

import pytest

from tether.agent.directory import DirectoryError, DirectoryService, Spool


def test_sync_to_spool_then_resume_incrementally(ldap_raw, ldap_admin, tmp_path):
    svc = DirectoryService(ldap_raw)
    spool = Spool(tmp_path / "spool")
    for msg in svc.sync(None, chunk_size=10):
        spool.append(msg)
    msgs = [m for _, m in spool.pending()]
    assert msgs[0]["mode"] == "full" and msgs[-1]["type"] == "end"
    spool.ack(len(msgs))
    assert len(spool) == 0
    assert ldap_admin.modify("uid=u019,ou=people,dc=example,dc=com",
                             {"mail": [("MODIFY_REPLACE", ["svc@example.com"])]})
    inc = list(svc.sync(msgs[-1]["cursor"]))
    assert inc[0]["mode"] == "incremental"
    assert any(c["attributes"]["email"] == "svc@example.com" for m in inc if m["type"] == "chunk"
               for c in m["changes"])
    svc.close()


def test_authenticate_provision_and_search(ldap_raw):
    svc = DirectoryService(ldap_raw)
    assert svc.authenticate("u007", "pw007")["outcome"] == "success"
    assert svc.provision({"id": "s1", "op": "update_user", "username": "u007",
                          "attributes": {"email": "seven@example.com"}})["status"] == "done"
    found = svc.search("user", "(mail=seven@example.com)")
    assert [r["attributes"]["username"] for r in found["results"]] == ["u007"] and not found["truncated"]
    some = svc.search("user", limit=3)
    assert len(some["results"]) == 3 and some["truncated"]
    with pytest.raises(DirectoryError) as info:
        svc.search("user", "(mail=unclosed")
    assert info.value.code == "bad_filter"
    svc.close()


def test_ca_given_as_pem_text(ldap_raw):
    from pathlib import Path
    ldap_raw["ca_pem"] = Path(ldap_raw.pop("ca_file")).read_text()
    svc = DirectoryService(ldap_raw)
    assert svc.authenticate("u003", "pw003")["outcome"] == "success"
    svc.close()
