#!/usr/bin/python3
"""Load N users and one group holding all of them into a stopped Samba DC's sam.ldb.

Why offline, through Samba's own Python bindings: over LDAP Samba adds about 50
users a second (100,000 would take over half an hour); written into sam.ldb
with the DC stopped, through the same dsdb module stack (SIDs, GUIDs, linked
attribute metadata are made by Samba as for any add), it is about 2 ms a user.

Why one transaction in ldb's batch mode (what `samba-tool domain join` and
provision use): outside it, every add is a nested transaction that copies each
index list it touches (objectClass=user holds every user), so a load is
quadratic: 35,000 users took 12 minutes, 100,000 would take over an hour and a
half. In batch mode ldb keeps the index lists in one cache until commit, and
100,000 users take about 3.5 minutes. (Batch mode gives up rolling back one
failed add: any error aborts the whole load, which is what a fixture wants.)
Runs under Debian's /usr/bin/python3, which has the samba bindings (the project
venv does not). Prints a progress line every 5,000 users.

Usage: samba_bulkload.py SMB_CONF SAM_LDB CONTAINER_DN PREFIX COUNT GROUP_CN
"""

import sys
import time

from samba.auth import system_session
from samba.param import LoadParm
from samba.samdb import SamDB

#: ldb options of a bulk load, as samba.provision.setup_samdb sets them with batch_mode:
#: the index cache is sized for about 100,000 users
OPTIONS = ["batch_mode:1", "transaction_index_cache_size:202481"]


def main() -> int:
    conf, url, container, prefix, count, group = sys.argv[1:7]
    count = int(count)
    lp = LoadParm()
    lp.load(conf)
    db = SamDB(url=url, session_info=system_session(), lp=lp, options=OPTIONS)
    started = time.monotonic()
    dns = [f"CN={prefix}{i:06d},{container}" for i in range(count)]
    db.transaction_start()
    try:
        for i, dn in enumerate(dns, 1):
            db.add({"dn": dn, "objectClass": "user", "sAMAccountName": f"{prefix}{i - 1:06d}",
                    "userAccountControl": "514"})
            if i % 5000 == 0 or i == count:
                print(f"samba bulk load: {i}/{count} users, {time.monotonic() - started:.0f} s",
                      flush=True)
        db.add({"dn": f"CN={group},{container}", "objectClass": "group", "sAMAccountName": group,
                "member": dns})
        print(f"samba bulk load: group {group} with {count} members; committing", flush=True)
    except BaseException:
        db.transaction_cancel()
        raise
    db.transaction_commit()
    print(f"samba bulk load: group {group} with {count} members, "
          f"{time.monotonic() - started:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
