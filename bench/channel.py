#!/usr/bin/env python3
"""Benchmark of the dial-home channel against a real ``tether-home serve`` on loopback.

Figures (printed and written to bench/results/channel.json):

* ``agent_start_to_hello_s``: from spawning ``tether-agent run`` to its first
  accepted hello, on first boot (keys + enrollment included) and on a restart
  (identity on disk);
* ``agent_rss_idle_mb``: resident memory of that agent process, idle with its
  two sockets up (goal <= 40 MB);
* ``round_trip_ms`` p50/p99: request → response through one channel socket
  (the agent's own Link + protocol.Session over TLS 1.3; a ``status`` request
  home answers);
* ``capacity``: N concurrent agent connections held by one home process, each
  an enrolled instance with its own certificate, sending heartbeats; home's
  CPU share and RSS while holding them (goal N >= 2,000). The connections are
  in-process (the agent's dialer and Link, one socket each) so one bench
  process can stand in for thousands of appliances.

* ``hostile`` (issue 11): a legitimate agent's ``status`` round trip p50/p99 on a
  quiet home, then again while one enrolled instance sends
  ``--hostile-frames`` hostile frames (reconnecting whenever home closes it):
  error frames with a 64 KB detail, ``config.ack`` and ``hello`` with 64 KB
  fields, heartbeats over budget, requests with fresh ids, garbage. Home's RSS and
  log bytes grown during each phase, and the ratios (goals: < 20 MB and < 5 MB
  above the quiet phase, p99 within 2x).

Usage: ``.venv/bin/python bench/channel.py [--agents 2000] [--hold 30]
[--hostile-frames 10000] [--only capacity|hostile]``.
Everything talks to 127.0.0.1 only. Run time ~2-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from homeproc import HomeProcess  # noqa: E402

from tether import protocol as p  # noqa: E402
from tether.agent import instancekeys, tlsctx  # noqa: E402
from tether.agent.dialer import DialOptions, open_socket, say_hello  # noqa: E402
from tether.agent.link import Link  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "channel.json"
AGENT_BIN = Path(sys.executable).parent / "tether-agent"


def install(bundle: dict, etc: Path) -> None:
    """The image credential as the identity role lays it out."""
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "image.key").write_text(bundle["key_pem"])
    (etc / "image.key").chmod(0o600)
    (etc / "image.crt").write_text(bundle["cert_pem"])
    (etc / "ca.crt").write_text(bundle["ca_pem"])
    (etc / "agent.json").write_text(json.dumps({k: bundle[k] for k in (
        "image_id", "connector", "home_urls", "fingerprint", "cert_serial")}))


def fake_dmi(directory: Path, n: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sys_vendor").write_text("QEMU\n")
    (directory / "product_uuid").write_text(f"00000000-0000-4000-8000-{n:012d}\n")
    return directory


def time_to_hello(etc: Path, state: Path, dmi: Path, log: Path) -> tuple[float, "psutil.Popen"]:
    """Spawn an agent; seconds until its log says socket 0 is connected (hello accepted)."""
    start = time.monotonic()
    handle = open(log, "ab")
    proc = psutil.Popen([str(AGENT_BIN), "run", "--etc", str(etc), "--state", str(state),
                         "--firstboot", str(state.parent / "none.json"), "--dmi-dir", str(dmi)],
                        stdout=handle, stderr=handle)
    handle.close()
    while time.monotonic() - start < 60:
        if "socket 0 connected" in log.read_text(errors="replace"):
            return time.monotonic() - start, proc
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.kill()
    raise RuntimeError(f"agent did not connect; log:\n{log.read_text()[-2000:]}")


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except psutil.TimeoutExpired:
        proc.kill()


def bench_agent_process(home: HomeProcess, tmp: Path) -> dict:
    bundle = home.issue_image()
    tmp.mkdir(parents=True, exist_ok=True)
    etc, state, dmi = tmp / "etc", tmp / "state", fake_dmi(tmp / "dmi", 1)
    install(bundle, etc)
    first, proc = time_to_hello(etc, state, dmi, tmp / "agent-first.log")
    time.sleep(3)  # both sockets up, heartbeats begin
    stop(proc)
    restart, proc = time_to_hello(etc, state, dmi, tmp / "agent-restart.log")
    time.sleep(10)  # idle
    mem = proc.memory_full_info()
    listening = [c for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    stop(proc)
    return {"agent_start_to_hello_s": {"first_boot_with_enrollment": round(first, 3),
                                       "restart": round(restart, 3)},
            "agent_rss_idle_mb": round(mem.rss / 2**20, 1),
            "agent_uss_idle_mb": round(mem.uss / 2**20, 1),
            "agent_listening_sockets": len(listening)}


# ------------------------------------------------------------ in-process agents


async def _noop_handler(link, message):
    return {}


async def enroll_one(home: HomeProcess, bundle: dict, image_ctx, n: int, tmp: Path) -> Path:
    """Enroll instance ``n`` the way the agent does; returns its state directory."""
    state = tmp / f"i{n}"
    keys, _ = instancekeys.load_or_create_keys(state)
    ws = await open_socket(home.url, DialOptions(lambda: image_ctx, lambda: None, "bench"))
    link = Link(ws, home.url, 0, _noop_handler)
    reader = asyncio.ensure_future(link.run())
    try:
        await say_hello(link, lambda ln: {"agent_version": "bench", "image_id": bundle["image_id"],
                                          "instance_id": None})
        response = await link.request(p.Op.ENROLL, {
            "csr_pem": instancekeys.make_csr(keys, bundle["image_id"]),
            "sealing_public_key": keys.sealing_public,
            "machine": {"fingerprint": f"bench-{n}", "platform": "qemu-kvm"}})
    finally:
        await ws.close()
        reader.cancel()
    cert = instancekeys.check_issued_cert(response.body["cert_pem"], keys,
                                      bundle["ca_pem"].encode())
    instancekeys.store_cert(state, cert)
    (state / "id").write_text(response.body["instance_id"])
    return state


async def connect_one(home: HomeProcess, bundle: dict, ca: Path, state: Path,
                      heartbeat_s: float) -> tuple[Link, asyncio.Task]:
    ctx = tlsctx.client_context(ca, instancekeys.cert_path(state), instancekeys.key_path(state))
    ws = await open_socket(home.url, DialOptions(lambda: ctx, lambda: None, "bench"))
    link = Link(ws, home.url, 0, _noop_handler)
    reader = asyncio.ensure_future(link.run())
    instance_id = (state / "id").read_text()
    await say_hello(link, lambda ln: {
        "agent_version": "bench", "image_id": bundle["image_id"], "instance_id": instance_id,
        "machine": {"fingerprint": state.name, "platform": "qemu-kvm"},
        "selfcheck": {"verdict": "ok", "shortfalls": []}, "listening": [],
        "socket_index": 0, "config_version": None})
    beat = asyncio.ensure_future(_heartbeats(link, reader, heartbeat_s))
    return link, beat


async def _heartbeats(link: Link, reader: asyncio.Task, every: float) -> None:
    await asyncio.sleep(every * (hash(link) % 1000) / 1000)  # spread the fleet
    while not reader.done():
        await link.event(p.Op.HEARTBEAT, {"uptime": time.monotonic(), "listening": [],
                                          "config_version": None})
        await asyncio.sleep(every)


async def gather_limited(coros, limit: int):
    sem = asyncio.Semaphore(limit)

    async def run(coro):
        async with sem:
            return await coro
    return await asyncio.gather(*(run(c) for c in coros))


async def bench_round_trip(home: HomeProcess, bundle: dict, ca: Path, state: Path,
                           count: int) -> dict:
    link, beat = await connect_one(home, bundle, ca, state, 30)
    for _ in range(20):  # warm-up
        await link.request(p.Op.STATUS, {})
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await link.request(p.Op.STATUS, {})
        samples.append((time.perf_counter() - start) * 1000)
    beat.cancel()
    await link.ws.close()
    samples.sort()
    return {"requests": count, "p50_ms": round(statistics.median(samples), 3),
            "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 3),
            "max_ms": round(samples[-1], 3)}


async def bench_capacity(home: HomeProcess, tmp: Path, agents: int, hold_s: float,
                         heartbeat_s: float) -> dict:
    bundle = home.issue_image()
    tmp.mkdir(parents=True, exist_ok=True)
    ca = tmp / "ca.crt"
    ca.write_text(bundle["ca_pem"])
    image_dir = tmp / "image"
    install(bundle, image_dir)
    image_ctx = tlsctx.client_context(ca, image_dir / "image.crt", image_dir / "image.key")

    started = time.monotonic()
    # At most 16 image sockets per image at once (home's cap; the 17th gets 429).
    states = await gather_limited((enroll_one(home, bundle, image_ctx, n, tmp)
                                   for n in range(agents)), 16)
    enroll_s = time.monotonic() - started
    print(f"  enrolled {agents} instances in {enroll_s:.1f} s", flush=True)

    round_trip = await bench_round_trip(home, bundle, ca, states[0], 1000)
    print(f"  round trip p50 {round_trip['p50_ms']} ms, p99 {round_trip['p99_ms']} ms",
          flush=True)

    started = time.monotonic()
    conns = await gather_limited((connect_one(home, bundle, ca, s, heartbeat_s)
                                  for s in states), 64)
    connect_s = time.monotonic() - started
    print(f"  {agents} sockets up in {connect_s:.1f} s; holding {hold_s:.0f} s", flush=True)

    home_proc = psutil.Process(home.proc.pid)
    home_proc.cpu_percent(None)
    cpu_before = home_proc.cpu_times()
    await asyncio.sleep(hold_s)
    cpu_after = home_proc.cpu_times()
    busy = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    live = await asyncio.to_thread(home.live) or {}
    alive = sum(1 for link, _ in conns if not link.ws.state.name == "CLOSED")
    rss = home_proc.memory_info().rss
    for link, beat in conns:
        beat.cancel()
    await gather_limited((link.ws.close() for link, _ in conns), 256)
    return {"agents": agents, "alive_after_hold": alive,
            "home_sockets_reported": live.get("sockets"),
            "heartbeat_every_s": heartbeat_s, "hold_s": hold_s,
            "home_cpu_percent_of_one_core": round(100 * busy / hold_s, 1),
            "home_rss_mb": round(rss / 2**20, 1),
            "home_rss_per_agent_kb": round(rss / agents / 1024, 1),
            "enroll_all_s": round(enroll_s, 1), "connect_all_s": round(connect_s, 1),
            "round_trip": round_trip}


# ------------------------------------------------------------ hostile peer (issue 11)


def _hostile_frames(agent, image_id: str, instance_id: str):
    """An endless mix of the frames issue 11 reported, with fresh ids."""
    big = "h" * 64_000
    kinds = [
        lambda: agent.forge(None, {"code": "internal", "detail": big}, kind="error"),
        lambda: agent.forge(None, {"code": "internal", "detail": "unsolicited"}, kind="error"),
        lambda: agent.forge(p.Op.CONFIG_ACK, {"version": 1, "status": big}, kind="event"),
        lambda: agent.forge(p.Op.CONFIG_ACK, {"version": 1, "status": "rejected",
                                              "detail": "d"}, kind="event"),
        lambda: agent.forge(p.Op.HELLO, {"agent_version": big, "image_id": image_id,
                                         "instance_id": instance_id}),
        lambda: agent.forge(p.Op.HEARTBEAT, {"uptime": 1.0}, kind="event"),
        lambda: agent.forge(p.Op.STATUS, {}),
        lambda: agent.forge(p.Op.STATUS, {}),
        lambda: '{"v":1,"id":"x","kind":"event","op":"heartbeat","ts":1' + "0" * 400 + ',"body":{}}',
        lambda: "garbage " * 100,
    ]
    n = 0
    while True:
        yield kinds[n % len(kinds)]()
        n += 1


async def _hostile(home: HomeProcess, bundle: dict, ctx, instance_id: str, frames: int) -> dict:
    """Send ``frames`` hostile frames, reconnecting whenever home closes the socket."""
    from websockets.exceptions import ConnectionClosed

    from homeproc import RawAgent

    sent, sockets, closed_1008 = 0, 0, 0
    while sent < frames:
        agent = await RawAgent.connect(home.url, ctx, close_timeout=1)
        sockets += 1
        hello = await agent.hello(bundle["image_id"], instance_id, config_version=10**6)
        assert isinstance(hello, p.ResponseReceived), hello

        async def drain():
            try:
                while True:
                    await agent.ws.recv()
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else None
        reader = asyncio.ensure_future(drain())
        try:
            for frame in _hostile_frames(agent, bundle["image_id"], instance_id):
                if sent >= frames or reader.done():
                    break
                await agent.ws.send(frame)
                sent += 1
        except ConnectionClosed:
            pass
        if not reader.done():
            await agent.ws.close()
        if await reader == 1008:
            closed_1008 += 1
    return {"frames": sent, "sockets": sockets, "closed_by_home_1008": closed_1008}


async def _status_round_trips(home: HomeProcess, bundle: dict, ca: Path, state: Path,
                              count: int, pause: float) -> dict:
    link, beat = await connect_one(home, bundle, ca, state, 30)
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await link.request(p.Op.STATUS, {})
        samples.append((time.perf_counter() - start) * 1000)
        await asyncio.sleep(pause)
    beat.cancel()
    await link.ws.close()
    samples.sort()
    return {"requests": count, "p50_ms": round(statistics.median(samples), 3),
            "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 3)}


async def bench_hostile(home: HomeProcess, tmp: Path, frames: int) -> dict:
    from homeproc import client_context, enroll

    bundle = home.issue_image()
    tmp.mkdir(parents=True, exist_ok=True)
    ca = tmp / "ca.crt"
    ca.write_text(bundle["ca_pem"])
    image_dir = tmp / "image"
    install(bundle, image_dir)
    image_ctx = tlsctx.client_context(ca, image_dir / "image.crt", image_dir / "image.key")
    good = await enroll_one(home, bundle, image_ctx, 0, tmp)
    attacker = home.issue_image()
    enrolled = await enroll(home, attacker, tmp, "hostile-machine")
    instance_id, cert_pem, key_pem, _ = enrolled
    hostile_ctx = client_context(attacker["ca_pem"], cert_pem, key_pem, tmp)
    proc = psutil.Process(home.proc.pid)
    requests, pause = 1000, 0.005

    await _status_round_trips(home, bundle, ca, good, 200, 0)  # warm-up
    rss0, log0 = proc.memory_info().rss, home.log_path.stat().st_size
    quiet = await _status_round_trips(home, bundle, ca, good, requests, pause)
    rss1, log1 = proc.memory_info().rss, home.log_path.stat().st_size
    print(f"  quiet: p50 {quiet['p50_ms']} ms p99 {quiet['p99_ms']} ms", flush=True)

    attack = asyncio.ensure_future(_hostile(home, attacker, hostile_ctx, instance_id, frames))
    loaded = await _status_round_trips(home, bundle, ca, good, requests, pause)
    attack_result = await attack
    rss2, log2 = proc.memory_info().rss, home.log_path.stat().st_size
    print(f"  hostile ({attack_result}): p50 {loaded['p50_ms']} ms p99 {loaded['p99_ms']} ms",
          flush=True)
    return {
        "hostile": attack_result,
        "quiet_round_trip_ms": quiet, "hostile_round_trip_ms": loaded,
        "p99_ratio_hostile_vs_quiet": round(loaded["p99_ms"] / quiet["p99_ms"], 2),
        "home_rss_grown_quiet_mb": round((rss1 - rss0) / 2**20, 2),
        "home_rss_grown_hostile_mb": round((rss2 - rss1) / 2**20, 2),
        "log_bytes_quiet": log1 - log0, "log_bytes_hostile": log2 - log1,
        "log_bytes_above_quiet_mb": round(((log2 - log1) - (log1 - log0)) / 2**20, 3),
        "rss_above_quiet_mb": round(((rss2 - rss1) - (rss1 - rss0)) / 2**20, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--hold", type=float, default=30.0)
    parser.add_argument("--heartbeat", type=float, default=5.0,
                        help="seconds between heartbeats of each connection during the hold")
    parser.add_argument("--hostile-frames", type=int, default=10_000)
    parser.add_argument("--only", choices=("capacity", "hostile"),
                        help="run one part (results merged into the existing file)")
    args = parser.parse_args()
    results: dict = {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    if args.only and RESULTS.exists():
        results = {**json.loads(RESULTS.read_text()), **results}
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if args.only != "capacity":
            with HomeProcess.start(tmp / "home-hostile", connector="bench",
                                   max_instances=10) as home:
                print(f"hostile peer: {args.hostile_frames} frames", flush=True)
                results["hostile"] = asyncio.run(bench_hostile(home, tmp / "hostile",
                                                               args.hostile_frames))
        if args.only == "hostile":
            return _write(results)
        with HomeProcess.start(tmp / "home", connector="bench",
                               max_instances=args.agents + 10) as home:
            print("agent process: start → accepted hello, idle RSS", flush=True)
            results.update(bench_agent_process(home, tmp / "proc"))
            print(f"  {results['agent_start_to_hello_s']}  RSS {results['agent_rss_idle_mb']} MB",
                  flush=True)
            print(f"capacity: {args.agents} agents with heartbeats", flush=True)
            capacity = asyncio.run(bench_capacity(home, tmp / "cap", args.agents, args.hold,
                                                  args.heartbeat))
            results["round_trip_ms"] = capacity.pop("round_trip")
            results["capacity"] = capacity
    return _write(results)


def _write(results: dict) -> int:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
