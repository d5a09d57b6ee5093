#!/usr/bin/python3
"""Load N users and one group holding all of them into a stopped Samba DC's sam.ldb.

Why offline, through Samba's own Python bindings: over LDAP Samba adds about 50
users a second (100,000 would take over half an hour); written into sam.ldb
with the DC stopped, through the same dsdb module stack (SIDs, GUIDs, linked
attribute metadata are made by Samba as for any add), it is a few milliseconds
a user. Runs under Debian's /usr/bin/python3, which has the samba bindings (the
project venv does not). Prints a progress line every 5,000 users.

Usage: samba_bulkload.py SMB_CONF SAM_LDB CONTAINER_DN PREFIX COUNT GROUP_CN
"""

import sys
import time

from samba.auth import system_session
from samba.param import LoadParm
from samba.samdb import SamDB

#: users per transaction (measured: 100 is faster than 1,000 or 5,000; one for all is slowest)
BATCH = 100


def main() -> int:
    conf, url, container, prefix, count, group = sys.argv[1:7]
    count = int(count)
    lp = LoadParm()
    lp.load(conf)
    db = SamDB(url=url, session_info=system_session(), lp=lp)
    started = time.monotonic()
    dns = [f"CN={prefix}{i:06d},{container}" for i in range(count)]
    for first in range(0, count, BATCH):
        db.transaction_start()
        for i in range(first, min(first + BATCH, count)):
            db.add({"dn": dns[i], "objectClass": "user", "sAMAccountName": f"{prefix}{i:06d}",
                    "userAccountControl": "514"})
        db.transaction_commit()
        done = min(first + BATCH, count)
        if done % 5000 == 0 or done == count:
            print(f"samba bulk load: {done}/{count} users, {time.monotonic() - started:.0f} s",
                  flush=True)
    db.transaction_start()
    db.add({"dn": f"CN={group},{container}", "objectClass": "group", "sAMAccountName": group,
            "member": dns})
    db.transaction_commit()
    print(f"samba bulk load: group {group} with {count} members, "
          f"{time.monotonic() - started:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
