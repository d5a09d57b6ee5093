#!/usr/bin/env python3
"""Home's identity store: cost of DN meaning and the membership relation (issue 12).

Applies one full sync of N users plus one group listing all of them (500
records a batch, as the agent's chunks arrive) to the store of this tree, and
the same stream to the store as it was before issue 12 (the module at commit
BASELINE, loaded from git), in the same process. Prints records/s for both,
their ratio, the time to apply a one-member change of the big group, and the
export time; writes bench/results/identity_store.json.
Options: --users N (default 100,000), --baseline COMMIT, --plain (DNs without
escapes, as most directories hold them; written to identity_store_plain.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "identity_store.json"
RESULTS_PLAIN = ROOT / "bench" / "results" / "identity_store_plain.json"
BASELINE = "a9cca5f"


def load_baseline(commit: str, tmp: Path):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:home/identity.py"],
                            check=True, capture_output=True, text=True).stdout
    path = tmp / "identity_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("identity_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["identity_baseline"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def stream(n: int, plain: bool = False) -> tuple[list[list[dict]], list[str]]:
    """The full sync's batches and the big group's member DNs.

    ``plain``: DNs as most directories hold them (ASCII, no escapes), members
    spelled as the entries' DNs, as slapd returns them, and random UUIDs as ids
    (as AD's objectGUIDs are; slapd's time-based entryUUIDs arrive nearly in
    order, which is cheaper); otherwise every DN is escaped and its member
    spelling differs (the full DN parser's cost).
    """
    if plain:
        dns = [f"uid=user{i:06d},ou=people,dc=example,dc=org" for i in range(n)]
        members = list(dns)
        draw = random.Random(12)  # random ids: each batch writes all over the trees
        ids = [str(uuid.UUID(int=draw.getrandbits(128), version=4)) for _ in range(n)]
    else:
        dns = [f"cn=User\\2C {i:06d},ou=People,dc=example,dc=org" for i in range(n)]
        members = [f"CN=user\\, {i:06d},OU=people,DC=Example,DC=org" for i in range(n)]
        ids = [f"u{i}" for i in range(n)]
    records = [{"op": "upsert", "kind": "user", "id": ids[i], "dn": d,
                "attributes": {"username": f"u{i}", "mail": f"u{i}@example.org"}}
               for i, d in enumerate(dns)]
    records.append({"op": "upsert", "kind": "group", "id": "big", "dn": "cn=big,dc=example,dc=org",
                    "attributes": {"name": "big"}, "members": members})
    msgs = [[{"type": "begin", "mode": "full", "directory": "d"}]]
    for k, i in enumerate(range(0, len(records), 500), 1):
        msgs.append([{"type": "chunk", "seq": k, "changes": records[i:i + 500]}])
    msgs.append([{"type": "end", "mode": "full", "cursor": "c", "count": len(records)}])
    return msgs, members


def run(store_class, tmp: Path, name: str, batches, members) -> dict:
    store = store_class(tmp / f"{name}.db")
    seq = 0
    t0 = time.perf_counter()
    for batch in batches:
        entries = []
        for message in batch:
            seq += 1
            entries.append({"seq": seq, "message": message})
        store.apply_batch("d", "i1", entries)
    full = time.perf_counter() - t0
    change = {"type": "chunk", "seq": 1, "changes": [{
        "op": "upsert", "kind": "group", "id": "big", "dn": "cn=big,dc=example,dc=org",
        "attributes": {"name": "big"}, "members": members + ["cn=new,dc=example,dc=org"]}]}
    t0 = time.perf_counter()
    store.apply_batch("d", "i1", [{"seq": seq + 1, "message": change}])
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.export_csv("d", tmp / f"{name}.csv")
    export = time.perf_counter() - t0
    store.close()
    return {"full_sync_s": round(full, 2), "records_per_s": round((len(members) + 1) / full),
            "one_member_change_s": round(one, 3), "export_s": round(export, 2)}


def member_of_rows(path: Path) -> int:
    """Users whose member_of is filled (the spellings differ: the baseline matched none)."""
    import csv
    csv.field_size_limit(1 << 30)  # the big group's members cell
    with open(path, newline="", encoding="utf-8") as fh:
        return sum(1 for row in csv.DictReader(fh) if row["member_of"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--plain", action="store_true",
                        help="plain ASCII DNs without escapes, as most directories hold them")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tether.home.directorystore import DirectoryStore
    batches, members = stream(args.users, args.plain)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = run(load_baseline(args.baseline, tmp).IdentityStore, tmp, "baseline", batches,
                   members)
        now = run(DirectoryStore, tmp, "now", batches, members)
        base["rows_with_member_of"] = member_of_rows(tmp / "baseline.csv")
        now["rows_with_member_of"] = member_of_rows(tmp / "now.csv")
    result = {"users": args.users, "plain_dns": args.plain, "baseline_commit": args.baseline, "baseline": base, "now": now,
              "ratio_records_per_s": round(now["records_per_s"] / base["records_per_s"], 2)}
    print(json.dumps(result, indent=2))
    out = RESULTS_PLAIN if args.plain else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
