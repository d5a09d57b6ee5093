"""The agent's drain against home's identity store: pipelined batches, in order, exactly once."""

from __future__ import annotations

import asyncio

from tether import protocol as p
from tether.agent.directory import drain as drain_mod
from tether.agent.directory.drain import Drain, DrainError
from tether.agent.directory.spool import Spool
from tether.agent.sockets import Sockets
from tether.home.directories import check_batch
from tether.home.directorystore import DirectoryStore


class FakeLink:
    """Encodes each request as the wire would, lets home apply it after a yield
    (so several are in flight), optionally losing chosen requests."""

    draining = False

    def __init__(self, store: DirectoryStore, lose: set[int] = frozenset()):
        self.store, self.lose = store, set(lose)
        self.sent, self.inflight, self.most_inflight = 0, 0, 0

    async def request(self, op, body, timeout):
        self.sent += 1
        number = self.sent
        wire = p.decode(p.encode(p.Message(id=f"r{number}", kind=p.Kind.REQUEST, op=op, ts=1.0,
                                           body=body)))
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        try:
            await asyncio.sleep(0.02)  # home's round trip: the drain reads and sends meanwhile
            if number in self.lose:
                raise ConnectionError("socket dropped")
            entries = check_batch(wire.body)
            result = self.store.apply_batch(wire.body["directory"], "i1", entries,
                                            wire.body.get("after"))
            return p.Message(id=f"a{number}", kind=p.Kind.RESPONSE, op=op, ts=1.0, re=f"r{number}",
                             body={"applied_through": result.applied_through, "leader": True})
        finally:
            self.inflight -= 1


class Directory:
    def __init__(self, spool):
        self.id, self.spool = "d", spool


def drain_for(directory, link) -> Drain:
    """A drain of one directory whose agent has one socket up, ``link``."""
    sockets = Sockets()
    sockets.connected(1, link)

    async def resign(directory):
        raise AssertionError("home named another leader")
    return Drain(lambda: [directory], sockets, resign)


def spool_full_sync(spool: Spool, users: int, per_chunk: int) -> None:
    spool.append({"type": "begin", "mode": "full", "directory": "d"})
    for n, lo in enumerate(range(0, users, per_chunk), 1):
        spool.append({"type": "chunk", "seq": n, "changes": [
            {"op": "upsert", "kind": "user", "id": str(i), "dn": f"uid=u{i},dc=x",
             "attributes": {"username": f"u{i}"}} for i in range(lo, min(users, lo + per_chunk))]})
    spool.append({"type": "end", "mode": "full", "cursor": "c1", "count": users})


def test_pipelined_drain_applies_everything_once_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(drain_mod, "BATCH_BUDGET", 4000)  # many small batches
    store = DirectoryStore(tmp_path / "identity.db")
    spool = Spool(tmp_path / "spool")
    spool_full_sync(spool, 200, 10)
    link = FakeLink(store)
    directory = Directory(spool)
    drain = drain_for(directory, link)

    async def run():
        while await drain.drain_one(link, directory):
            pass
    asyncio.run(run())
    assert link.most_inflight == drain_mod.WINDOW  # batches really overlapped
    assert len(spool) == 0 and store.applied_through("d", "i1") == 22
    assert len(list(store.entries("d"))) == 200 and store.cursor("d") == "c1"
    store.close()


def test_lost_batch_is_not_skipped_by_the_ones_sent_after_it(tmp_path, monkeypatch):
    """The second request of a window is lost; the third reaches home but names
    the second's last seq in `after`, so home refuses it instead of skipping."""
    monkeypatch.setattr(drain_mod, "BATCH_BUDGET", 4000)
    store = DirectoryStore(tmp_path / "identity.db")
    spool = Spool(tmp_path / "spool")
    spool_full_sync(spool, 200, 10)
    link = FakeLink(store, lose={2})
    directory = Directory(spool)
    drain = drain_for(directory, link)

    async def first_window():
        try:
            await drain.drain_one(link, directory)
        except ConnectionError:
            pass
        await asyncio.sleep(0.1)  # let the abandoned third request reach home
    asyncio.run(first_window())
    through = store.applied_through("d", "i1")
    assert 0 < through < 22 and len(spool) == 22 - through  # acked only what home applied
    applied = {e["id"] for e in store.entries("d")}
    assert applied == set()  # the full snapshot is still staging: nothing swapped early

    async def rest():
        while await drain.drain_one(link, directory):
            pass
    asyncio.run(rest())
    assert len(spool) == 0 and len(list(store.entries("d"))) == 200
    store.close()


def test_home_applying_nothing_is_an_error_not_a_loop(tmp_path):
    """A batch whose `after` home has not applied comes back with nothing applied."""
    store = DirectoryStore(tmp_path / "identity.db")
    spool = Spool(tmp_path / "spool")
    spool_full_sync(spool, 5, 1)
    spool.ack(2)  # seqs 1-2 "went elsewhere": home has applied nothing of this instance
    link = FakeLink(store)
    directory = Directory(spool)
    drain = drain_for(directory, link)

    async def send_with_unmet_after():
        batch = await drain._next_batch(directory, 0)
        response = await drain._send(link, directory, batch, after=2)
        return await drain._settle(directory, batch, response)
    try:
        asyncio.run(send_with_unmet_after())
    except DrainError as exc:
        assert "applied none" in str(exc)
    else:
        raise AssertionError("expected DrainError")
    assert len(spool) == 5 and store.applied_through("d", "i1") == 0
    store.close()
