"""Home does not grow with connection churn and bad frames (leak guard).

Not a timing test: it counts bytes. 600 connections (each with bad frames, a
hello and a close) after a warm-up must not grow home's RSS by more than 3 MiB;
a per-connection leak as small as 5 KiB would exceed that.
"""

from __future__ import annotations

import asyncio

import psutil
import pytest

from homeproc import HomeProcess, RawAgent, client_context

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
BAD = ["{", "[]", b"\xff", '{"v":1,"id":"x","kind":"request","op":"nope","ts":1,"body":{}}']


async def churn(home, bundle, ctx, count: int) -> None:
    for _ in range(count):
        agent = await RawAgent.connect(home.url, ctx)
        for frame in BAD:
            await agent.send_raw(frame)
            await agent.recv_message()
        await agent.hello(bundle["image_id"])
        await agent.close()


def test_connection_churn_does_not_grow_home(tmp_path):
    with HomeProcess.start(tmp_path) as home:
        bundle = home.issue_image()
        ctx = client_context(bundle["ca_pem"], bundle["cert_pem"], bundle["key_pem"], tmp_path)
        proc = psutil.Process(home.proc.pid)
        asyncio.run(churn(home, bundle, ctx, 150))
        before = proc.memory_info().rss
        asyncio.run(churn(home, bundle, ctx, 600))
        grown = proc.memory_info().rss - before
        assert home.live()["sockets"] == 0
    assert grown < 3 * 2**20, f"home grew {grown / 2**20:.1f} MiB over 600 connections"
