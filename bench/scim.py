#!/usr/bin/env python3
"""SCIM lookups on a 100,000-user identity store (issue 15; goal >= 1,000/s).

What it measures, in one process on one store file:
- the store filled as a full sync fills it (``DirectoryStore.apply_batch``, chunks of 1,000);
- ``GET /Users?filter=userName eq "..."`` per second through the SCIM Starlette app
  (home/api/scim.py) called in process as ASGI (no sockets, no TLS: the listener is
  api-core's), each request a different random user, p50/p99 per request;
- the same through httpx's ASGI transport (what a Python client in process pays);
- ``externalId eq`` lookups, and one unindexed filter (``emails.value co``) that
  scans every user, for scale;
- the baseline: the store's indexed lookup alone (``find_by_field``) in the same run,
  so the ratio says what SCIM costs on top of SQLite.

Prints the figures and writes bench/results/scim.json.
Options: --users N (default 100,000), --requests N (default 3,000).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

ROOT = Path(__file__).resolve().parent.parent
from tether.home.api.scim import scim_routes  # noqa: E402
from tether.home.directorystore import DirectoryStore  # noqa: E402

DIRECTORY = "corp"


def fill(store: DirectoryStore, users: int) -> float:
    started = time.perf_counter()
    seq = 1
    store.apply_batch(DIRECTORY, "bench", [{"seq": seq, "message": {"type": "begin", "mode": "full"}}])
    for start in range(0, users, 1000):
        seq += 1
        changes = [{"op": "upsert", "kind": "user", "id": f"{i:08d}-0000-4000-8000-000000000000",
                    "dn": f"uid=user{i:06d},ou=people,dc=bench,dc=test",
                    "attributes": {"username": f"user{i:06d}", "name": f"User {i}",
                                   "email": f"user{i:06d}@example.com"}}
                   for i in range(start, min(users, start + 1000))]
        store.apply_batch(DIRECTORY, "bench", [{"seq": seq, "message": {"type": "chunk",
                                                                        "changes": changes}}])
    seq += 1
    store.apply_batch(DIRECTORY, "bench", [{"seq": seq, "message": {"type": "end", "cursor": "c"}}])
    for i in range(0, users, 10):
        store.set_external_id(DIRECTORY, f"{i:08d}-0000-4000-8000-000000000000", f"ext-{i}")
    return time.perf_counter() - started


async def asgi_get(app, path: str, query: str) -> tuple[int, bytes]:
    """One GET straight through the ASGI app: what the listener hands it per request."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "https", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query.encode(), "server": ("home.test", 443),
             "client": ("127.0.0.1", 50000),
             "headers": [(b"host", b"home.test"), (b"authorization", b"Bearer bench")]}
    status, body = 0, bytearray()

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))
    await app(scope, receive, send)
    return status, bytes(body)


def figures(times: list[float]) -> dict:
    times = sorted(times)
    return {"per_s": round(len(times) / sum(times), 1),
            "p50_ms": round(statistics.median(times) * 1000, 3),
            "p99_ms": round(times[int(len(times) * 0.99) - 1] * 1000, 3)}


async def run(store: DirectoryStore, users: int, requests: int) -> dict:
    async def authorize(request, scope):
        return None

    async def provision(directory, order):
        raise RuntimeError("the benchmark only reads")

    app = Starlette(routes=[Mount("/scim/v2/{directory}", routes=scim_routes(
        directory_store=store, provision=provision, authorize=authorize))])
    rng = random.Random(15)
    picks = [rng.randrange(users) for _ in range(requests)]
    path = f"/scim/v2/{DIRECTORY}/Users"

    # baseline: the store's indexed lookup alone
    times = []
    for i in picks:
        t = time.perf_counter()
        found = store.find_by_field(DIRECTORY, "user", "username", f"USER{i:06d}")
        times.append(time.perf_counter() - t)
        assert len(found) == 1
    baseline = figures(times)

    async def measure(make_query, check) -> dict:
        times = []
        for i in picks:
            query = make_query(i)
            t = time.perf_counter()
            status, body = await asgi_get(app, path, query)
            times.append(time.perf_counter() - t)
            if status != 200:
                raise SystemExit(f"GET {path}?{query}: {status} {body[:300]!r}")
            check(i, json.loads(body))
        return figures(times)

    def one_user(i, body):
        assert body["totalResults"] == 1 and body["Resources"][0]["userName"] == f"user{i:06d}"
    username = await measure(lambda i: "filter=" + quote(f'userName eq "User{i:06d}"'), one_user)
    def one_external(i, body):
        assert body["totalResults"] == 1, body
    external = await measure(lambda i: "filter=" + quote(f'externalId eq "ext-{i - i % 10}"'),
                             one_external)

    # the same through httpx's ASGI transport
    transport = httpx.ASGITransport(app=app)
    times = []
    async with httpx.AsyncClient(transport=transport, base_url="https://home.test") as client:
        for i in picks[:min(requests, 1000)]:
            t = time.perf_counter()
            r = await client.get(path, params={"filter": f'userName eq "user{i:06d}"'})
            times.append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["totalResults"] == 1
    via_httpx = figures(times)

    # one filter no index answers: every user is matched
    t = time.perf_counter()
    status, body = await asgi_get(app, path, "count=10&filter=" + quote('emails.value co "99999@"'))
    scan_s = time.perf_counter() - t
    assert status == 200 and json.loads(body)["totalResults"] == users // 100000, body[:300]
    return {"store_lookup": baseline, "scim_username_eq": username,
            "scim_externalid_eq": external, "scim_username_eq_httpx": via_httpx,
            "scim_unindexed_scan_s": round(scan_s, 3),
            "ratio_scim_to_store": round(username["per_s"] / baseline["per_s"], 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-bench-scim-") as tmp:
        store = DirectoryStore(Path(tmp) / "identity.db")
        print(f"scim: filling an identity store with {args.users:,} users...", flush=True)
        fill_s = fill(store, args.users)
        print(f"scim: filled in {fill_s:.1f} s; {args.requests:,} lookups each way...", flush=True)
        result = asyncio.run(run(store, args.users, args.requests))
        store.close()
    result = {"users": args.users, "requests": args.requests, "fill_s": round(fill_s, 1),
              "goal_per_s": 1000, **result}
    u = result["scim_username_eq"]
    print(f"GET /Users?filter=userName eq: {u['per_s']:,.0f}/s p50 {u['p50_ms']} ms "
          f"p99 {u['p99_ms']} ms (goal >= 1,000/s) on {args.users:,} users")
    e = result["scim_externalid_eq"]
    print(f"GET /Users?filter=externalId eq: {e['per_s']:,.0f}/s p50 {e['p50_ms']} ms p99 {e['p99_ms']} ms")
    h = result["scim_username_eq_httpx"]
    print(f"  through httpx's ASGI transport: {h['per_s']:,.0f}/s p50 {h['p50_ms']} ms")
    b = result["store_lookup"]
    print(f"  baseline, store lookup alone: {b['per_s']:,.0f}/s (SCIM/store ratio "
          f"{result['ratio_scim_to_store']})")
    print(f"  unindexed filter (emails.value co) over every user: {result['scim_unindexed_scan_s']} s")
    out = ROOT / "bench" / "results" / "scim.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
