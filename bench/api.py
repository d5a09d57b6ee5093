#!/usr/bin/env python3
"""HTTPS API benchmark (issue 15): authentications and token issuance through home's API.

All in one run, real processes on 127.0.0.1: a slapd with --users users (LDAPS),
a ``tether-home serve --api-listen`` and one enrolled ``tether-agent run``
serving the directory. Measured, each with per-second rate and p50/p99:

- direct ldap3 bind on a new LDAPS connection per login (what a naive IdP does);
- direct rebind on one kept LDAPS connection (the floor of an LDAP password check);
- the agent's own engine without home (``AuthPool``: user look-up, bind, nested
  groups) with 1 and --concurrency threads: the ceiling of any login through an
  agent on this machine, since every API login does that work; and once more in
  one thread with the requests built by ldap3/pyasn1 (before requestber), whose
  CPU per login over requestber's is printed as a ratio;
- ``POST /v1/directories/<d>/authenticate`` through the API (TLS, keep-alive, a
  long-lived bearer token): home -> agent over its WebSocket -> user look-up,
  bind, nested groups; with 1 and --concurrency clients in flight; and the same
  with ``"groups": false`` (user look-up and bind only: the password check);
- ``POST /oauth2/token`` (client credentials, RFC 9068 JWT) issuance.

The HTTP client is a minimal keep-alive HTTP/1.1 client on asyncio streams, so
the client's own cost stays small next to home's. Prints the figures and
writes bench/results/api.json. Goal: >= 1,000 authentications/s with p99 <= 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import ssl
import sys
import tempfile
import time
from pathlib import Path

import ldap3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration" / "ldap"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from ldapfix_ca import make_ca  # noqa: E402
from ldapfix_slapd import SUFFIX, SVC_DN, SVC_PW, create_slapd, ssha  # noqa: E402
from tether.agent.directory.auth import AuthPool  # noqa: E402
from tether.agent.directory.config import load_config  # noqa: E402
from tether.agent.directory.connection import tune_socket  # noqa: E402

PW = "bench-pw"


def generate_ldif(path: Path, users: int) -> None:
    pw = ssha(PW, salt=b"benchslt")
    people = f"ou=people,{SUFFIX}"
    with open(path, "w") as fh:
        for i in range(users):
            fh.write(f"dn: uid=user{i:06d},{people}\nobjectClass: inetOrgPerson\nuid: user{i:06d}\n"
                     f"cn: User {i}\nsn: {i}\nuserPassword: {pw}\n\n")
        for g in range(10):
            fh.write(f"dn: cn=group{g},ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: group{g}\n")
            for i in range(g, users, 10):
                fh.write(f"member: uid=user{i:06d},{people}\n")
            fh.write("\n")


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def figures(count: int, seconds: float, latencies: list[float]) -> dict:
    return {"count": count, "per_s": round(count / seconds, 1),
            "p50_ms": round(pct(latencies, 50) * 1e3, 2), "p99_ms": round(pct(latencies, 99) * 1e3, 2)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process used so far (/proc/<pid>/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU milliseconds per login of each process on the path, over one measurement.

    Why: on a 2-core machine shared by client, home, agent and slapd, the rate is
    bounded by the CPU all of them need per login; this says who needs what.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def per_login_ms(self, count: int) -> dict:
        return {name: round((cpu_seconds(pid) - self.start[name]) * 1e3 / count, 3)
                for name, pid in self.pids.items()}


def direct(server, ca, names: list[str]) -> dict:
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca.ca_file))
    srv = ldap3.Server("localhost", port=server.tls_port, use_ssl=True, tls=tls, get_info=ldap3.NONE)
    out = {}

    def new_connection(name):
        c = ldap3.Connection(srv, f"uid={name},ou=people,{SUFFIX}", PW)
        c.open()
        tune_socket(c)
        assert c.bind(), c.result
        c.unbind()
    kept = ldap3.Connection(srv, SVC_DN, SVC_PW)
    kept.open()
    tune_socket(kept)

    def rebind(name):
        kept.user, kept.password = f"uid={name},ou=people,{SUFFIX}", PW
        assert kept.bind(), kept.result
    for label, fn in (("direct_new_connection", new_connection), ("direct_rebind", rebind)):
        lat = []
        t0 = time.perf_counter()
        for name in names:
            t = time.perf_counter()
            fn(name)
            lat.append(time.perf_counter() - t)
        out[label] = figures(len(names), time.perf_counter() - t0, lat)
    kept.unbind()
    return out


def engine(raw: dict, names: list[str], threads: int, groups: bool = True,
           through_ldap3: bool = False) -> dict:
    """Logins through the agent's AuthPool in `threads` threads, no home, no WebSocket.

    `through_ldap3`: the look-up, bind and group searches built and encoded by
    ldap3/pyasn1, as before requestber (the baseline of the same run).
    """

    from tether.agent.directory import requestber

    fast = requestber._fast
    if through_ldap3:
        requestber._fast = lambda conn: False
    try:
        return _engine(raw, names, threads, groups)
    finally:
        requestber._fast = fast


def _engine(raw: dict, names: list[str], threads: int, groups: bool) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    pool = AuthPool(load_config(raw), size=threads)
    outcomes: dict[str, int] = {}

    def one(name: str) -> float:
        t = time.perf_counter()
        outcome = pool.authenticate(name, PW, with_groups=groups)["outcome"]
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        return time.perf_counter() - t
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, names[:threads * 4]))  # connect every Authenticator first
        outcomes.clear()
        t0 = time.perf_counter()
        lat = list(ex.map(one, names))
        out = figures(len(names), time.perf_counter() - t0, lat)
    pool.close()
    out["outcomes"] = outcomes
    return out


class Http:
    """One keep-alive HTTP/1.1 connection over TLS (just enough for this bench)."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ctx) -> Http:
        return cls(*await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                  server_hostname="127.0.0.1"))

    async def post(self, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def through_api(port: int, ctx, token: str, names: list[str], concurrency: int,
                      groups: bool = True) -> dict:
    conns = [await Http.open(port, ctx) for _ in range(concurrency)]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    queue = list(enumerate(names))
    lat: list[float] = []
    outcomes: dict[str, int] = {}

    async def worker(conn: Http) -> None:
        while queue:
            _, name = queue.pop()
            body = json.dumps({"username": name, "password": PW,
                               **({} if groups else {"groups": False})}).encode()
            t = time.perf_counter()
            status, data = await conn.post("/v1/directories/bench/authenticate", body, headers)
            lat.append(time.perf_counter() - t)
            key = json.loads(data).get("outcome") if status == 200 else str(status)
            outcomes[key] = outcomes.get(key, 0) + 1
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    out = figures(len(names), time.perf_counter() - t0, lat)
    out["outcomes"] = outcomes
    for c in conns:
        c.close()
    return out


async def at_rate(port: int, ctx, token: str, names: list[str], rate: float, groups: bool = True,
                  connections: int = 64) -> dict:
    """Open loop: login i is due at start + i/rate whatever became of those before it,
    the way an identity provider's logins arrive. Its latency counts from when it was
    due, so time spent waiting for a free connection counts too (no coordinated
    omission). The closed loop above (N in flight) measures capacity instead: it keeps
    the server saturated, so its p99 is mostly queueing."""
    free: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        free.put_nowait(await Http.open(port, ctx))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    lat: list[float] = []
    outcomes: dict[str, int] = {}

    async def one(name: str, due: float) -> None:
        conn = await free.get()
        try:
            body = json.dumps({"username": name, "password": PW,
                               **({} if groups else {"groups": False})}).encode()
            status, data = await conn.post("/v1/directories/bench/authenticate", body, headers)
        finally:
            free.put_nowait(conn)
        lat.append(time.perf_counter() - due)
        key = json.loads(data).get("outcome") if status == 200 else str(status)
        outcomes[key] = outcomes.get(key, 0) + 1
    start = time.perf_counter() + 0.05
    tasks = []
    for i, name in enumerate(names):
        due = start + i / rate
        if due > time.perf_counter():
            await asyncio.sleep(due - time.perf_counter())
        tasks.append(asyncio.create_task(one(name, due)))
    await asyncio.gather(*tasks)
    out = figures(len(names), time.perf_counter() - start, lat)
    out.update(offered_per_s=rate, outcomes=outcomes)
    while not free.empty():
        free.get_nowait().close()
    return out


async def tokens(port: int, ctx, client: str, secret: str, n: int) -> dict:
    conn = await Http.open(port, ctx)
    basic = base64.b64encode(f"{client}:{secret}".encode()).decode()
    headers = {"Authorization": f"Basic {basic}",
               "Content-Type": "application/x-www-form-urlencoded"}
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        status, _ = await conn.post("/oauth2/token", b"grant_type=client_credentials", headers)
        assert status == 200, status
        lat.append(time.perf_counter() - t)
    out = figures(n, time.perf_counter() - t0, lat)
    conn.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--auth", type=int, default=2000, help="authentications per measurement")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 8, 32],
                    help="requests in flight through the API (1 is always measured)")
    ap.add_argument("--auth-connections", type=int, default=None,
                    help="the directory's auth_connections (default: the agent's default)")
    ap.add_argument("--hold", type=float, default=0,
                    help="seconds to wait before the API runs (to attach a profiler)")
    ap.add_argument("--rates", type=float, nargs="*", default=[1000],
                    help="open-loop logins offered per second (the goal's 1,000/s)")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "api.json"))
    args = ap.parse_args()
    from e2erig import Rig, directory_entry, wait_for
    from homeproc import HomeProcess

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="tether-bench-api-"))
    ca = make_ca(tmp / "tls", dns_names=("localhost",))
    ldif = tmp / "data.ldif"
    generate_ldif(ldif, args.users)
    server = create_slapd(tmp / "slapd", ca, data_ldif=ldif)
    rig = None
    try:
        names = [f"user{(i * 7919) % args.users:06d}" for i in range(args.auth)]
        print(f"api bench: {args.users} users in slapd; direct binds x{args.auth} ...", flush=True)
        result = {"users": args.users, "cpus": os.cpu_count(), "load_average_at_start": load_at_start}
        meter = CpuMeter({"client": os.getpid(), "slapd": server.proc.pid})
        result.update(direct(server, ca, names))
        result["direct_cpu_ms_per_bind_both_runs"] = meter.per_login_ms(2 * len(names))
        for label in ("direct_new_connection", "direct_rebind"):
            r = result[label]
            print(f"  {label:24s} {r['per_s']:8.1f}/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms")
        raw = {"name": "bench", "kind": "openldap", "servers": [f"localhost:{server.tls_port}"],
               "tls": "ldaps", "ca_file": str(ca.ca_file), "bind_dn": SVC_DN,
               "bind_password": SVC_PW, "base_dns": [SUFFIX], "page_size": 1000}
        if args.auth_connections:
            raw["auth_connections"] = args.auth_connections
        pool_size = load_config(raw).auth_connections
        for groups, tag in ((True, ""), (False, "_password_only")):
            for threads, via in [(t, "") for t in sorted({1, pool_size})] + [(1, "_through_ldap3")]:
                meter = CpuMeter({"engine": os.getpid(), "slapd": server.proc.pid})
                r = engine(raw, names, threads, groups, through_ldap3=bool(via))
                r["cpu_ms_per_login"] = meter.per_login_ms(len(names))
                result[f"engine{tag}{via}_threads_{threads}"] = r
                print(f"  agent engine{tag}{via}, {threads:2d} threads  {r['per_s']:8.1f}/s  p50 "
                      f"{r['p50_ms']} ms  p99 {r['p99_ms']} ms  {r['outcomes']}  cpu ms/login "
                      f"{r['cpu_ms_per_login']}", flush=True)
            one = result[f"engine{tag}_threads_1"]["cpu_ms_per_login"]["engine"]
            before = result[f"engine{tag}_through_ldap3_threads_1"]["cpu_ms_per_login"]["engine"]
            result[f"engine{tag}_cpu_ratio_ldap3_requests_to_requestber"] = round(before / one, 2)
            print(f"  agent engine{tag}: CPU per login through ldap3's request encoding / "
                  f"requestber = {before / one:.2f}", flush=True)
        home = HomeProcess.start(tmp / "home", connector="c-a",
                                 serve_args=("--api-listen", "127.0.0.1:0", "--log-level", "INFO"))
        rig = Rig(home, ("c-a",))
        agent = rig.agent("c-a")
        rig.configure({"directories": [directory_entry("bench", raw)]})
        wait_for(lambda: (rig.directory_status("bench") or {}).get("users") == args.users, 600,
                 "home's store to hold every user")
        port = int(home.live()["api_address"].rsplit(":", 1)[1])
        out = rig.cli("api-client", "create", "bench", "--scope", "authenticate")
        secret = re.search(r"client_secret: (\S+)", out.stdout).group(1)
        token = rig.cli("api-client", "token", "bench").stdout.strip()
        ctx = ssl.create_default_context(cafile=str(home.ca_cert))
        asyncio.run(through_api(port, ctx, token, names[:200], 1))  # warm-up
        if args.hold:
            print(f"  home pid {home.proc.pid}; holding {args.hold} s", flush=True)
            time.sleep(args.hold)
        levels = sorted({1, *args.concurrency})
        pids = {"client": os.getpid(), "home": home.proc.pid, "agent": agent.proc.pid,
                "slapd": server.proc.pid}
        def measure(key: str, label: str, run) -> None:
            meter = CpuMeter(pids)
            r = asyncio.run(run)
            r["cpu_ms_per_login"] = meter.per_login_ms(len(names))
            result[key] = r
            print(f"  API authenticate{label} {r['per_s']:8.1f}/s  p50 {r['p50_ms']} ms  p99 "
                  f"{r['p99_ms']} ms  {r['outcomes']}  cpu ms/login {r['cpu_ms_per_login']}", flush=True)
        for groups, tag in ((True, ""), (False, "_password_only")):
            # distinct names within a run: a user name takes one attempt at a time
            for conc in levels:
                measure(f"api{tag}_concurrency_{conc}", f"{tag}, {conc:2d} in flight",
                        through_api(port, ctx, token, names, conc, groups))
            for rate in args.rates:
                measure(f"api{tag}_open_loop_{rate:g}_per_s", f"{tag}, {rate:g}/s offered",
                        at_rate(port, ctx, token, names, rate, groups))
        r = asyncio.run(tokens(port, ctx, "bench", secret, args.tokens))
        result["token_issuance"] = r
        print(f"  token issuance (client credentials, JWT) {r['per_s']:8.1f}/s  p50 {r['p50_ms']} ms  "
              f"p99 {r['p99_ms']} ms", flush=True)
        best = max(result[f"api_concurrency_{c}"]["per_s"] for c in levels)
        best_engine = max(result[f"engine_threads_{t}"]["per_s"] for t in {1, pool_size})
        result["auth_connections"] = pool_size
        result["ratio_api_best_to_engine_best"] = round(best / best_engine, 2)
        best_po = max(result[f"api_password_only_concurrency_{c}"]["per_s"] for c in levels)
        best_engine_po = max(result[f"engine_password_only_threads_{t}"]["per_s"]
                             for t in {1, pool_size})
        result["ratio_api_password_only_best_to_engine_best"] = round(best_po / best_engine_po, 2)
        result["ratio_api_password_only_best_to_direct_rebind"] = round(
            best_po / result["direct_rebind"]["per_s"], 2)
        result["ratio_api_best_to_direct_new_connection"] = round(
            best / result["direct_new_connection"]["per_s"], 2)
        result["ratio_api_best_to_direct_rebind"] = round(best / result["direct_rebind"]["per_s"], 2)
        result["goal"] = {"per_s": 1000, "p99_ms": 10}
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        if rig is not None:
            rig.stop()
        server.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
