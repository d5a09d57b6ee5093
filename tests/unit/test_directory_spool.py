"""The directory change spool: ordered, fsync'd, survives restarts, removes only on ack."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tether.agent.directory.spool import Spool, SpoolError


def test_entries_come_back_in_order_and_leave_only_when_acked(tmp_path):
    spool = Spool(tmp_path / "s")
    seqs = [spool.append({"n": i}) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert [item["n"] for _, item in spool.pending()] == [0, 1, 2, 3, 4]
    assert spool.pending(limit=2) == [(1, {"n": 0}), (2, {"n": 1})]
    assert spool.ack(2) == 2
    assert [s for s, _ in spool.pending()] == [3, 4, 5]
    assert spool.ack(2) == 0  # a repeated ack is harmless


def test_survives_a_restart_and_keeps_numbering(tmp_path):
    Spool(tmp_path).append({"a": 1})
    again = Spool(tmp_path)
    assert again.pending() == [(1, {"a": 1})]
    assert again.append({"b": 2}) == 2


def test_survives_a_killed_process(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal
        from tether.agent.directory.spool import Spool
        s = Spool({str(tmp_path)!r})
        for i in range(3):
            s.append({{"i": i}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    assert [item["i"] for _, item in Spool(tmp_path).pending()] == [0, 1, 2]


def test_every_append_is_fsynced_before_it_returns(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    Spool(tmp_path).append({"x": 1})
    assert len(calls) == 2  # the file and its directory entry


def test_half_written_entries_are_discarded(tmp_path):
    (tmp_path / "0000000000000001.tmp").write_bytes(b'{"trunc')
    spool = Spool(tmp_path)
    assert spool.pending() == [] and spool.append({"ok": True}) == 1


def test_damaged_entry_is_a_clear_error(tmp_path):
    spool = Spool(tmp_path)
    spool.append({"ok": True})
    (tmp_path / "0000000000000001.json").write_bytes(b"not json")
    with pytest.raises(SpoolError, match="full resync"):
        spool.pending()


def test_full_disk_is_a_clear_error_and_leaves_no_debris(tmp_path, monkeypatch):
    import errno
    spool = Spool(tmp_path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SpoolError, match="No space left on device.*free disk space"):
        spool.append({"x": 1})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [] and spool.append({"x": 2}) == 1


def test_raw_entries_are_the_stored_json_bytes(tmp_path):
    """The drain reads entries unparsed (it splices them into its frame)."""
    from tether.agent.directory.spool import encode_item
    spool = Spool(tmp_path)
    spool.append({"name": "Zoë"})
    spool.append_encoded(encode_item({"n": 2}))
    spool.append({"n": 3})
    assert spool.pending_raw() == [(1, '{"name":"Zoë"}'.encode()), (2, b'{"n":2}'), (3, b'{"n":3}')]
    assert [s for s, _ in spool.pending_raw(limit=1, after=1)] == [2]
    assert spool.pending()[1] == (2, {"n": 2})


def test_unencodable_item_is_refused_before_it_is_stored(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError):
        spool.append({"x": float("nan")})
    assert len(spool) == 0
