#!/usr/bin/env python3
"""Directory engine benchmark against a real slapd (issue 5).

What it measures, all in one run against the same server over LDAPS:
- slapadd load rate of the generated LDIF (default 100,000 users + 1,000 groups);
- full sync entries/s through tether.agent.directory.sync.full_sync versus a
  bare ldap3 paged search of the same entries (ratio; goals >= 0.6 and >= 8,000/s);
- change -> record latency (write, notification, incremental sync returns the
  record) p50/p95 through the ChangeNotifier + incremental sync, for slapd and Samba AD;
- authentication throughput and p99 through the Authenticator versus a direct bind;
- end to end through real processes (a `tether-home serve` and an enrolled
  `tether-agent run` on 127.0.0.1, configuration pushed with `config set`): full
  sync entries/s from `config set` (which makes home send `sync follow`) until
  home's identity.db holds every entry, and its ratio to the bare ldap3 paged
  search of the same run; change -> home store latency p50/p95 (slapd, and Samba
  AD unless --no-ad); authentication through home's control API (the
  `tether-home authenticate` path: control socket -> Hub -> agent -> LDAP) versus
  direct ldap3 binds.

Prints the figures and writes bench/results/directory.json.
Options: --users N --groups N --auth N --changes N (smaller for a quick look),
--no-engine (only the bare read and the end-to-end figures), --no-e2e, --no-ad.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

import ldap3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration" / "ldap"))

from ldapfix_ca import make_ca  # noqa: E402
from ldapfix_slapd import SUFFIX, SVC_DN, SVC_PW, create_slapd  # noqa: E402
from tether.agent.directory.auth import Authenticator  # noqa: E402
from tether.agent.directory.config import load_config  # noqa: E402
from tether.agent.directory.connection import tune_socket  # noqa: E402
from tether.agent.directory.incremental import changes_since  # noqa: E402
from tether.agent.directory.notify import ChangeNotifier  # noqa: E402
from tether.agent.directory.sync import full_sync  # noqa: E402

PAGE = 1000
BENCH_PW = "bench-pw"
BIG_GROUP = f"cn=everyone,ou=groups,{SUFFIX}"


def generate_ldif(path: Path, users: int, groups: int, big_group: bool = False) -> None:
    """inetOrgPerson users; each user in one group (groupOfNames), groups of equal size;
    with `big_group`, one more group `everyone` holding every user (issue 12)."""
    from ldapfix_slapd import ssha
    pw = ssha(BENCH_PW, salt=b"benchslt")
    people = f"ou=people,{SUFFIX}"
    with open(path, "w") as fh:
        for i in range(users):
            fh.write(f"dn: uid=user{i:06d},{people}\nobjectClass: inetOrgPerson\nuid: user{i:06d}\n"
                     f"cn: User {i}\nsn: {i}\nmail: user{i:06d}@example.com\nuserPassword: {pw}\n\n")
        for g in range(groups):
            fh.write(f"dn: cn=group{g:04d},ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: group{g:04d}\n")
            for i in range(g, users, groups):
                fh.write(f"member: uid=user{i:06d},{people}\n")
            fh.write("\n")
        if big_group:
            fh.write(f"dn: {BIG_GROUP}\nobjectClass: groupOfNames\ncn: everyone\n")
            for i in range(users):
                fh.write(f"member: uid=user{i:06d},{people}\n")
            fh.write("\n")


def raw_config(server, ca) -> dict:
    return {"name": "bench", "kind": "openldap", "servers": [f"localhost:{server.tls_port}"], "tls": "ldaps",
            "ca_file": str(ca.ca_file), "bind_dn": SVC_DN, "bind_password": SVC_PW, "base_dns": [SUFFIX],
            "page_size": PAGE}


def bare_paged(server, ca, config) -> tuple[int, float]:
    """Bare ldap3: the same two paged searches (users, groups) the engine runs, no processing."""
    from tether.agent.directory.mapping import search_attributes
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca.ca_file))
    t0 = time.perf_counter()
    conn = ldap3.Connection(ldap3.Server("localhost", port=server.tls_port, use_ssl=True, tls=tls,
                                         get_info=ldap3.NONE), SVC_DN, SVC_PW, check_names=False)
    conn.open()
    tune_socket(conn)  # same TCP_NODELAY as the engine, so the comparison is fair
    conn.bind()
    n = 0
    for kind, flt in (("user", config.user_filter), ("group", config.group_filter)):
        for _ in conn.extend.standard.paged_search(SUFFIX, flt, attributes=search_attributes(config, kind),
                                                   paged_size=PAGE, generator=True):
            n += 1
    conn.unbind()
    return n, time.perf_counter() - t0


def engine_sync(config) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for msg in full_sync(config, chunk_size=PAGE):
        if msg["type"] == "chunk":
            n += len(msg["changes"])
    return n, time.perf_counter() - t0


def bench_full_sync(server, ca, config) -> dict:
    """Best of two alternating runs each, after a warm-up read (the same server, the same entries)."""
    print("  warm-up read ...", flush=True)
    bare_paged(server, ca, config)
    runs = {"bare": [], "engine": []}
    for _ in range(2):
        for name, fn in (("bare", lambda: bare_paged(server, ca, config)), ("engine", lambda: engine_sync(config))):
            n, secs = fn()
            runs[name].append((n, secs))
            print(f"  {name:6s} full read: {n} entries in {secs:.2f} s = {n / secs:,.0f} entries/s", flush=True)
    if runs["bare"][0][0] != runs["engine"][0][0]:
        raise RuntimeError(f"engine read {runs['engine'][0][0]} entries, bare ldap3 {runs['bare'][0][0]}")
    bare_best = max(n / s for n, s in runs["bare"])
    engine_best = max(n / s for n, s in runs["engine"])
    print(f"  ratio engine/bare = {engine_best / bare_best:.2f} (goal >= 0.6), engine {engine_best:,.0f}/s "
          f"(goal >= 8,000/s)", flush=True)
    return {"entries": runs["engine"][0][0], "engine_per_s": round(engine_best),
            "bare_ldap3_per_s": round(bare_best), "ratio": round(engine_best / bare_best, 3),
            "goal_ratio": 0.6, "goal_per_s": 8000, "page_size": PAGE}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def bench_auth(server, ca, config, n: int, users: int) -> dict:
    """Logins through the Authenticator vs direct binds (new TLS connection each, and rebinding one)."""
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca.ca_file))
    srv = ldap3.Server("localhost", port=server.tls_port, use_ssl=True, tls=tls, get_info=ldap3.NONE)
    names = [f"user{(i * 7919) % users:06d}" for i in range(n)]

    def timed(fn) -> tuple[float, list[float]]:
        lat = []
        t0 = time.perf_counter()
        for name in names:
            t = time.perf_counter()
            fn(name)
            lat.append(time.perf_counter() - t)
        return n / (time.perf_counter() - t0), lat

    def new_connection(name):
        c = ldap3.Connection(srv, f"uid={name},ou=people,{SUFFIX}", BENCH_PW)
        c.open()
        tune_socket(c)
        assert c.bind(), c.result
        c.unbind()

    kept = ldap3.Connection(srv, f"uid={names[0]},ou=people,{SUFFIX}", BENCH_PW)
    kept.open()
    tune_socket(kept)

    def rebind(name):
        kept.user, kept.password = f"uid={name},ou=people,{SUFFIX}", BENCH_PW
        assert kept.bind(), kept.result

    auth = Authenticator(config)

    def engine(name):
        out = auth.authenticate(name, BENCH_PW, with_groups=True)
        assert out["outcome"] == "success", out

    def engine_nogroups(name):
        assert auth.authenticate(name, BENCH_PW, with_groups=False)["outcome"] == "success"

    out = {"count": n, "engine_includes": "user look-up by uid + user bind (+ nested group resolution)"}
    for label, fn in (("direct_new_connection", new_connection), ("direct_rebind", rebind),
                      ("engine", engine), ("engine_without_groups", engine_nogroups)):
        rate, lat = timed(fn)
        out[label] = {"per_s": round(rate, 1), "p50_ms": round(pct(lat, 50) * 1e3, 2),
                      "p99_ms": round(pct(lat, 99) * 1e3, 2)}
    kept.unbind()
    auth.close()
    return out


def bench_changes(config, admin, dns: list[str]) -> dict:
    """Write -> notification -> incremental sync returns the changed record (p50/p95)."""
    cursor = next(m for m in _start(config))
    wake = threading.Event()
    notifier = ChangeNotifier(config, lambda e: wake.set())
    notifier.start()
    time.sleep(0.5)
    latencies = []
    try:
        for i, dn in enumerate(dns):
            while True:  # drain the incremental sync so the next write starts from a clean cursor
                msgs = list(changes_since(config, cursor))
                cursor = msgs[-1]["cursor"]
                if len(msgs) == 2:
                    break
            wake.clear()
            value = f"changed{i}-{time.time_ns()}@example.com"
            t = time.perf_counter()
            assert admin.modify(dn, {"mail": [(ldap3.MODIFY_REPLACE, [value])]}), admin.result
            if not wake.wait(10):
                raise RuntimeError("no notification within 10 s")
            found = False
            while not found:
                for msg in changes_since(config, cursor):
                    if msg["type"] == "chunk":
                        found |= any(c["attributes"].get("email") == value for c in msg["changes"])
                    elif msg["type"] == "end":
                        cursor = msg["cursor"]
            latencies.append(time.perf_counter() - t)
    finally:
        notifier.stop()
    return {"count": len(dns), "p50_ms": round(pct(latencies, 50) * 1e3, 1),
            "p95_ms": round(pct(latencies, 95) * 1e3, 1)}


def bench_openldap_changes(server, ca, config, n: int) -> dict:
    from ldapfix_slapd import ADMIN_DN, ADMIN_PW
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca.ca_file))
    admin = ldap3.Connection(ldap3.Server("localhost", port=server.tls_port, use_ssl=True, tls=tls,
                                          get_info=ldap3.NONE), ADMIN_DN, ADMIN_PW, auto_bind=True)
    try:
        return bench_changes(config, admin, [f"uid=user{i:06d},ou=people,{SUFFIX}" for i in range(n)])
    finally:
        admin.unbind()


def bench_ad_changes(tmp: Path, ca, n: int) -> dict:
    """The same change -> record latency against a Samba AD DC on 127.0.0.1 (persistent search + USN)."""
    from ldapfix_helpers import ad_admin_connection, ad_config, ad_user
    from ldapfix_samba import create_samba
    print("  provisioning a Samba AD DC (about 10 s) ...", flush=True)
    dc = create_samba(tmp / "samba", ca)
    try:
        admin = ad_admin_connection(ca)
        dns = [ad_user(admin, f"bench{i:03d}") for i in range(n)]
        try:
            return bench_changes(load_config(ad_config(ca)), admin, dns)
        finally:
            admin.unbind()
    finally:
        dc.destroy()


def bench_failover(tmp: Path, ca) -> dict:
    """Seconds from losing the primary mid-sync to the next page from the secondary.

    Two replicas with identical entries (same entryUUIDs); `stopped` = slapd
    ended (connection refused), `hung` = SIGSTOP (sockets open, no answers:
    detected by receive_timeout, default 5 s).
    """
    import os
    import signal
    import uuid
    from ldapfix_slapd import user_ldif
    data = "\n".join(user_ldif(f"fo{i:05d}", "pw", entryUUID=str(uuid.uuid5(uuid.NAMESPACE_DNS, f"fo{i}")))
                     for i in range(2000))
    out = {}
    for mode in ("stopped", "hung"):
        primary = create_slapd(tmp / f"fo-{mode}-p", ca, data_ldif=data)
        secondary = create_slapd(tmp / f"fo-{mode}-s", ca, data_ldif=data)
        try:
            raw = raw_config(primary, ca)
            raw.update(page_size=100, servers=[f"localhost:{primary.tls_port}", f"localhost:{secondary.tls_port}"])
            lost_at, gap, ids = None, None, set()
            for msg in full_sync(load_config(raw), chunk_size=100):
                if msg["type"] != "chunk":
                    continue
                if lost_at is not None and gap is None:
                    gap = time.perf_counter() - lost_at
                ids.update(c["id"] for c in msg["changes"])
                if msg["seq"] == 3:
                    if mode == "stopped":
                        primary.stop()
                    else:
                        os.kill(primary.proc.pid, signal.SIGSTOP)
                    lost_at = time.perf_counter()
            out[mode] = {"seconds_to_next_page": round(gap, 2), "entries": len(ids), "complete": len(ids) == 2000}
        finally:
            if primary.proc is not None:
                os.kill(primary.proc.pid, signal.SIGCONT)
            primary.destroy()
            secondary.destroy()
    return out


# ------------------------------------------------------------------ end to end


def _store_count(db: Path, directory: str) -> int:
    import sqlite3
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM entries WHERE directory = ?", (directory,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # the schema is not there yet


def _store_mail(conn, directory: str, dn: str):
    row = conn.execute("SELECT attributes FROM entries WHERE directory = ? AND dn = ?", (directory, dn)).fetchone()
    return json.loads(row[0]).get("email") if row else None


def e2e_change_latency(db: Path, directory: str, admin, dns: list[str], timeout: float = 60.0) -> dict:
    """Directory write -> the new value is in home's identity.db (polled every 5 ms)."""
    import sqlite3
    latencies = []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        for i, dn in enumerate(dns):
            value = f"e2e{i}-{time.time_ns()}@example.com"
            t = time.perf_counter()
            assert admin.modify(dn, {"mail": [(ldap3.MODIFY_REPLACE, [value])]}), admin.result
            while _store_mail(conn, directory, dn) != value:
                if time.perf_counter() - t > timeout:
                    raise RuntimeError(f"{dn}: change not in home's store after {timeout} s")
                time.sleep(0.005)
            latencies.append(time.perf_counter() - t)
    finally:
        conn.close()
    return {"count": len(dns), "p50_ms": round(pct(latencies, 50) * 1e3, 1),
            "p95_ms": round(pct(latencies, 95) * 1e3, 1), "max_ms": round(max(latencies) * 1e3, 1)}


def e2e_auth(state: Path, directory: str, names: list[str], threads: int = 1) -> dict:
    """Logins through home's control socket (what `tether-home authenticate` sends)."""
    from concurrent.futures import ThreadPoolExecutor

    from tether.home import control
    sock = state / "control.sock"

    def one(name: str) -> float:
        t = time.perf_counter()
        reply = control.call(sock, {"cmd": "authenticate", "directory": directory,
                                    "username": name, "password": BENCH_PW}, timeout=120)
        if not (reply and reply.get("ok") and reply["result"].get("outcome") == "success"):
            raise RuntimeError(f"authenticate {name} through home: {reply}")
        return time.perf_counter() - t
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        lat = list(pool.map(one, names))
    rate = len(names) / (time.perf_counter() - t0)
    return {"threads": threads, "count": len(names), "per_s": round(rate, 1),
            "p50_ms": round(pct(lat, 50) * 1e3, 2), "p99_ms": round(pct(lat, 99) * 1e3, 2)}


def bench_e2e(tmp: Path, server, ca, raw: dict, total: int, bare_per_s: float, args) -> dict:
    """Real home + agent processes: full sync, change latency, authentication (OpenLDAP)."""
    from e2erig import Rig, directory_entry
    from ldapfix_slapd import ADMIN_DN, ADMIN_PW
    rig = Rig.start(tmp / "e2e", connectors=("c-a",))
    try:
        agent = rig.agent("c-a")
        db = rig.state / "identity.db"
        print("  e2e: config set -> home stores every entry ...", flush=True)
        t0 = time.perf_counter()
        rig.configure({"directories": [directory_entry("bench", raw)]})
        while _store_count(db, "bench") < total:
            if time.perf_counter() - t0 > 3600 or not agent.alive() or rig.home.proc.poll() is not None:
                raise RuntimeError(f"e2e full sync incomplete: {_store_count(db, 'bench')}/{total}; "
                                   f"home log tail:\n{rig.home.log_text()[-2000:]}\nagent:\n{agent.log()[-2000:]}")
            time.sleep(0.05)
        secs = time.perf_counter() - t0
        rate = total / secs
        status = rig.directory_status("bench")
        full = {"entries": total, "seconds": round(secs, 2), "per_s": round(rate),
                "bare_ldap3_per_s": round(bare_per_s), "ratio": round(rate / bare_per_s, 3),
                "goal_ratio": 0.6, "goal_per_s": 8000, "cursor_stored": bool(status and status.get("cursor")),
                "measured": "config set (home pushes, elects, sends sync follow) -> identity.db holds "
                            "every entry (full snapshot swapped in)"}
        print(f"  e2e full sync: {total} entries in {secs:.1f} s = {rate:,.0f} entries/s, ratio to bare "
              f"ldap3 {full['ratio']:.2f} (goals >= 0.6, >= 8,000/s)", flush=True)
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca.ca_file))
        admin = ldap3.Connection(ldap3.Server("localhost", port=server.tls_port, use_ssl=True, tls=tls,
                                              get_info=ldap3.NONE), ADMIN_DN, ADMIN_PW, auto_bind=True)
        try:
            time.sleep(2)  # let the follower settle after the full sync
            changes = e2e_change_latency(db, "bench", admin, [f"uid=user{(i * 977) % args.users:06d},ou=people,{SUFFIX}"
                                                               for i in range(args.changes)])
        finally:
            admin.unbind()
        print(f"  e2e change -> home store (OpenLDAP): p50 {changes['p50_ms']} ms, p95 {changes['p95_ms']} ms",
              flush=True)
        names = [f"user{(i * 7919) % args.users:06d}" for i in range(args.auth)]
        auth = {"path": "control socket -> home Hub -> agent (WebSocket/TLS) -> user look-up + bind + nested groups"}
        for threads in (1, 4):
            auth[f"threads_{threads}"] = e2e_auth(rig.state, "bench", names, threads)
            a = auth[f"threads_{threads}"]
            print(f"  e2e auth through home, {threads} client thread(s): {a['per_s']}/s  p50 {a['p50_ms']} ms  "
                  f"p99 {a['p99_ms']} ms", flush=True)
        return {"full_sync": full, "change_latency_openldap": changes, "auth": auth}
    finally:
        rig.stop()


class PeakRSS:
    """Samples the resident set size of some processes every 50 ms (psutil), keeps the peak."""

    def __init__(self, pids: dict[str, int]):
        import psutil
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.idle = {name: p.memory_info().rss for name, p in self.procs.items()}
        self.peak = dict(self.idle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, p in self.procs.items():
                try:
                    self.peak[name] = max(self.peak[name], p.memory_info().rss)
                except Exception:  # noqa: BLE001 - the process ended: keep its peak
                    pass

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        mb = 1 << 20
        return {name: {"idle_mb": round(self.idle[name] / mb, 1), "peak_mb": round(self.peak[name] / mb, 1),
                       "above_idle_mb": round((self.peak[name] - self.idle[name]) / mb, 1),
                       "goal_above_idle_mb": 150} for name in self.procs}


def _group_has(conn, directory: str, dn: str) -> bool:
    row = conn.execute("SELECT instr(members, ?) FROM entries WHERE directory = ? AND dn = ?",
                       (json.dumps(dn), directory, BIG_GROUP)).fetchone()
    return bool(row and row[0])


def bench_big_group(tmp: Path, server, ca, raw: dict, total: int, bare_per_s: float, engine: dict | None,
                    n: int, users: int) -> dict:
    """One group holding every user (issue 12): end-to-end full sync with it, then one-member
    changes of that group (write -> home's store), and the peak RSS of agent and home."""
    import sqlite3

    from e2erig import Rig, directory_entry
    from ldapfix_slapd import ADMIN_DN, ADMIN_PW
    rig = Rig.start(tmp / "e2e-big", connectors=("c-a",))
    try:
        agent = rig.agent("c-a")
        time.sleep(2)
        rss = PeakRSS({"agent": agent.proc.pid, "home": rig.home.proc.pid})
        db = rig.state / "identity.db"
        print(f"  big group: config set -> home stores {total} entries incl. a {users}-member group ...",
              flush=True)
        t0 = time.perf_counter()
        rig.configure({"directories": [directory_entry("big", raw)]})
        while _store_count(db, "big") < total:
            if time.perf_counter() - t0 > 3600 or not agent.alive() or rig.home.proc.poll() is not None:
                raise RuntimeError(f"big-group full sync incomplete: {_store_count(db, 'big')}/{total}")
            time.sleep(0.05)
        secs = time.perf_counter() - t0
        full = {"entries": total, "seconds": round(secs, 2), "per_s": round(total / secs),
                "bare_ldap3_per_s": round(bare_per_s), "ratio": round(total / secs / bare_per_s, 3),
                "goal_ratio": 1.0}
        print(f"  big group e2e full sync: {total / secs:,.0f} entries/s, ratio to bare ldap3 "
              f"{full['ratio']:.2f}", flush=True)
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca.ca_file))
        admin = ldap3.Connection(ldap3.Server("localhost", port=server.tls_port, use_ssl=True, tls=tls,
                                              get_info=ldap3.NONE), ADMIN_DN, ADMIN_PW, auto_bind=True)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        latencies = []
        try:
            time.sleep(2)
            for i in range(n):
                dn = f"uid=extra{i:04d}-{time.time_ns()},ou=people,{SUFFIX}"
                t = time.perf_counter()
                assert admin.modify(BIG_GROUP, {"member": [(ldap3.MODIFY_ADD, [dn])]}), admin.result
                while not _group_has(conn, "big", dn):
                    if time.perf_counter() - t > 120:
                        raise RuntimeError(f"member {dn} not in home's store after 120 s")
                    time.sleep(0.005)
                latencies.append(time.perf_counter() - t)
        finally:
            conn.close()
            admin.unbind()
        memory = rss.stop()
        change = {"count": n, "p50_ms": round(pct(latencies, 50) * 1e3, 1),
                  "p95_ms": round(pct(latencies, 95) * 1e3, 1), "max_ms": round(max(latencies) * 1e3, 1),
                  "goal_p95_ms": 1000}
        print(f"  one-member change of the {users}-member group -> home store: p50 {change['p50_ms']} ms, "
              f"p95 {change['p95_ms']} ms (goal <= 1000)", flush=True)
        for name, m in memory.items():
            print(f"  peak RSS {name}: {m['peak_mb']} MB, {m['above_idle_mb']} MB above idle (goal < 150)",
                  flush=True)
        return {"members": users, "engine_full_sync": engine, "e2e_full_sync": full,
                "one_member_change": change, "rss": memory}
    finally:
        rig.stop()


def bench_e2e_ad(tmp: Path, ca, n: int) -> dict:
    """change -> home store latency against a Samba AD DC, through real home + agent processes."""
    from e2erig import Rig, directory_entry
    from ldapfix_helpers import ad_admin_connection, ad_config, ad_user
    from ldapfix_samba import create_samba
    print("  e2e AD: provisioning a Samba AD DC (about 10 s) ...", flush=True)
    dc = create_samba(tmp / "samba-e2e", ca)
    rig = None
    try:
        admin = ad_admin_connection(ca)
        dns = [ad_user(admin, f"e2e{i:03d}") for i in range(n)]
        rig = Rig.start(tmp / "e2e-ad", connectors=("c-a",))
        rig.agent("c-a")
        rig.configure({"directories": [directory_entry("ad", ad_config(ca))]})
        db = rig.state / "identity.db"
        deadline = time.perf_counter() + 600
        while _store_count(db, "ad") < n:
            if time.perf_counter() > deadline:
                raise RuntimeError("AD full sync did not reach home")
            time.sleep(0.1)
        time.sleep(2)
        try:
            return e2e_change_latency(db, "ad", admin, dns)
        finally:
            admin.unbind()
    finally:
        if rig is not None:
            rig.stop()
        dc.destroy()


def _start(config):
    from tether.agent.directory.connection import Pool
    from tether.agent.directory.incremental import start_cursor
    conn = Pool(config).connect()
    try:
        yield start_cursor(config, conn)
    finally:
        conn.unbind()


def main_big_group(args) -> int:
    """The large-group phase on its own slapd: engine and bare ldap3 reads, then end to end."""
    tmp = Path(tempfile.mkdtemp(prefix="tether-bench-big-"))
    server = None
    out = Path(args.out).with_name("directory_big_group.json") if args.out.endswith("directory.json") \
        else Path(args.out)
    try:
        ca = make_ca(tmp / "tls")
        ldif = tmp / "data.ldif"
        print(f"directory bench (big group): {args.users} users + {args.groups} groups + one group of "
              f"all {args.users} ...", flush=True)
        generate_ldif(ldif, args.users, args.groups, big_group=True)
        server = create_slapd(tmp / "slapd", ca, data_ldif=ldif, map_size=8 << 30, start=False)
        server.start()
        config = load_config(raw_config(server, ca))
        total = args.users + args.groups + 1
        engine = bench_full_sync(server, ca, config)
        result = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
                  "users": args.users, "groups": args.groups + 1,
                  **bench_big_group(tmp, server, ca, raw_config(server, ca), total,
                                    engine["bare_ldap3_per_s"], engine, args.changes, args.users),
                  "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"  wrote {out}")
        return 0
    finally:
        if server is not None:
            server.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--groups", type=int, default=1_000)
    ap.add_argument("--auth", type=int, default=1_000)
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--no-ad", action="store_true", help="skip the Samba AD DC latency figures")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine-only figures")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end (home + agent) figures")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "directory.json"))
    ap.add_argument("--big-group", action="store_true",
                    help="only the large-group phase (issue 12): one group of every user next to them; "
                         "writes bench/results/directory_big_group.json")
    args = ap.parse_args()
    if args.big_group:
        return main_big_group(args)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="tether-bench-dir-"))
    server = None
    try:
        ca = make_ca(tmp / "tls")
        ldif = tmp / "data.ldif"
        print(f"directory bench: generating {args.users} users + {args.groups} groups ...", flush=True)
        generate_ldif(ldif, args.users, args.groups)
        t = time.perf_counter()
        server = create_slapd(tmp / "slapd", ca, data_ldif=ldif, map_size=8 << 30, start=False)
        load_s = time.perf_counter() - t
        total = args.users + args.groups
        print(f"  slapadd: {total} entries in {load_s:.1f} s = {total / load_s:,.0f} entries/s", flush=True)
        server.start()
        config = load_config(raw_config(server, ca))
        full = auth = changes = failover = ad_changes = e2e = None
        if args.no_engine:
            print("  warm-up read ...", flush=True)
            bare_paged(server, ca, config)
            bare = [bare_paged(server, ca, config) for _ in range(2)]
            full = {"entries": bare[0][0], "bare_ldap3_per_s": round(max(n / s for n, s in bare)),
                    "page_size": PAGE}
            print(f"  bare ldap3 full read: {full['bare_ldap3_per_s']:,} entries/s", flush=True)
        else:
            full = bench_full_sync(server, ca, config)
            print(f"  authentication x{args.auth} ...", flush=True)
            auth = bench_auth(server, ca, config, args.auth, args.users)
            for label in ("direct_new_connection", "direct_rebind", "engine", "engine_without_groups"):
                print(f"  auth {label:22s}: {auth[label]['per_s']:7.1f}/s  p50 {auth[label]['p50_ms']} ms  "
                      f"p99 {auth[label]['p99_ms']} ms", flush=True)
            print(f"  change -> record latency x{args.changes} ...", flush=True)
            changes = bench_openldap_changes(server, ca, config, args.changes)
            print(f"  change -> record (OpenLDAP): p50 {changes['p50_ms']} ms, p95 {changes['p95_ms']} ms",
                  flush=True)
        if not args.no_e2e:
            e2e = bench_e2e(tmp, server, ca, raw_config(server, ca), total, full["bare_ldap3_per_s"], args)
            if auth is not None:
                e2e["auth"]["direct_new_connection"] = auth["direct_new_connection"]
                e2e["auth"]["direct_rebind"] = auth["direct_rebind"]
                e2e["auth"]["engine_in_process"] = auth["engine"]
        server.destroy()
        server = None
        if not args.no_engine:
            failover = bench_failover(tmp, ca)
            for mode, f in failover.items():
                print(f"  failover, primary {mode} mid-sync: next page after {f['seconds_to_next_page']} s, "
                      f"complete={f['complete']} (goal <= 10 s)", flush=True)
        if not args.no_ad and not args.no_engine:
            ad_changes = bench_ad_changes(tmp, ca, args.changes)
            print(f"  change -> record (Samba AD): p50 {ad_changes['p50_ms']} ms, "
                  f"p95 {ad_changes['p95_ms']} ms", flush=True)
        if not args.no_ad and e2e is not None:
            e2e["change_latency_samba_ad"] = bench_e2e_ad(tmp, ca, args.changes)
            print(f"  e2e change -> home store (Samba AD): p50 {e2e['change_latency_samba_ad']['p50_ms']} ms, "
                  f"p95 {e2e['change_latency_samba_ad']['p95_ms']} ms", flush=True)
        result = {
            "server": "OpenLDAP slapd 2.5 (mdb, syncprov, accesslog, ppolicy), LDAPS on 127.0.0.1",
            "users": args.users, "groups": args.groups, "load_average_at_start": load_at_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
            "slapadd_entries_per_s": round(total / load_s),
            "full_sync": full,
            "auth": auth, "failover": failover, "change_latency_openldap": changes, "change_latency_samba_ad": ad_changes,
            "change_latency_means": "directory write -> notification -> incremental sync returns the record "
                                    "(the agent side of change -> home store; the channel adds its own time)",
            "end_to_end": e2e,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"  wrote {args.out}")
        return 0
    finally:
        if server is not None:
            server.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
