"""Many agents on one home: every one is enrolled, connected, counted and heard.

Functional assertions only (all sockets up, status sees every instance, the
server survives); the figures it prints (RSS per agent, steady CPU) are for the
notes, never asserted. Default 300 agents; the capacity run is

    TETHER_HOME_LOAD_AGENTS=2000 .venv/bin/python -m pytest -s \
        tests/integration/test_home_load.py
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time

import psutil
import pytest

from homeproc import HomeProcess, RawAgent, client_context, enroll
from tether import protocol as p

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
AGENTS = int(os.environ.get("TETHER_HOME_LOAD_AGENTS", "300"))
HOLD_SECONDS = float(os.environ.get("TETHER_HOME_LOAD_HOLD", "20"))
HEARTBEAT_SECONDS = 5.0


def _lift_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _beat(agent: RawAgent, stop: asyncio.Event) -> None:
    while not stop.is_set():
        agent.session.event(p.Op.HEARTBEAT, {"uptime": time.monotonic(), "listening": []})
        await agent.flush()
        try:
            await asyncio.wait_for(stop.wait(), HEARTBEAT_SECONDS)
        except TimeoutError:
            pass


async def _drain(agent: RawAgent) -> None:
    try:
        async for _ in agent.ws:
            pass
    except Exception:  # noqa: BLE001 - the socket's end is all we wait for
        pass


async def _run(home: HomeProcess, tmp) -> dict:
    bundle = home.issue_image()
    gate = asyncio.Semaphore(20)

    # Home holds at most 16 image-credential sockets per image (issue 11): stay below.
    enrolling = asyncio.Semaphore(8)

    async def enroll_one(i: int):
        async with enrolling:
            return await enroll(home, bundle, tmp / "certs", f"machine-{i:05d}")
    enrolled = await asyncio.gather(*(enroll_one(i) for i in range(AGENTS)))
    proc = psutil.Process(home.proc.pid)
    rss_before = proc.memory_info().rss

    async def connect(entry):
        instance_id, cert, key, _ = entry
        async with gate:
            agent = await RawAgent.connect(home.url, client_context(bundle["ca_pem"], cert, key,
                                                                    tmp / "ctx"))
            hello = await agent.hello(bundle["image_id"], instance_id, config_version=0)
            assert isinstance(hello, p.ResponseReceived), hello
            return agent
    agents = await asyncio.gather(*(connect(e) for e in enrolled))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_beat(a, stop)) for a in agents]
    tasks += [asyncio.create_task(_drain(a)) for a in agents]
    cpu0, wall0 = proc.cpu_times(), time.monotonic()
    await asyncio.sleep(HOLD_SECONDS)
    cpu1, wall1 = proc.cpu_times(), time.monotonic()
    live = home.live()
    status = await asyncio.to_thread(home.status)
    rss = proc.memory_info().rss
    stop.set()
    await asyncio.gather(*(a.close() for a in agents), return_exceptions=True)
    for task in tasks:
        task.cancel()
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (wall1 - wall0)
    return {"live": live, "status": status, "figures": {
        "agents": AGENTS, "heartbeat_s": HEARTBEAT_SECONDS, "hold_s": HOLD_SECONDS,
        "home_rss_mb": round(rss / 2**20, 1),
        "home_rss_per_agent_kb": round((rss - rss_before) / AGENTS / 1024, 1),
        "home_cpu_percent": round(cpu * 100, 1)}}


def test_many_agents_with_heartbeats(tmp_path):
    _lift_fd_limit()
    with HomeProcess.start(tmp_path, connector="fleet", max_instances=AGENTS) as home:
        result = asyncio.run(_run(home, tmp_path))
        assert home.proc.poll() is None
    print("\nhome load:", json.dumps(result["figures"]))
    assert result["live"]["sockets"] == AGENTS
    instances = result["status"]["instances"]
    assert len(instances) == AGENTS
    assert all(i["connected_sockets"] == 1 for i in instances)
    assert all(i["last_seen"] is not None and i["listening"] == [] for i in instances)
