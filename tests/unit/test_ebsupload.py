"""EBS upload planning without a server: which blocks are candidates, the journal."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from tether.image import ebsupload
from tether.image.ebsupload import BLOCK_SIZE

BLOCKS = 24


def _nonzero_blocks(path) -> set[int]:
    """What the uploader must send: every block that holds a non-zero byte."""
    fd = os.open(path, os.O_RDONLY)
    try:
        total = -(-os.fstat(fd).st_size // BLOCK_SIZE)
        return {i for i in range(total) if ebsupload.read_block(fd, i) != ebsupload.ZERO_BLOCK}
    finally:
        os.close(fd)


def _sent_blocks(path) -> set[int]:
    """The uploader's plan: hole-skipping candidates, then the zero check."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return {i for i in ebsupload.data_blocks(fd, size)
                if ebsupload.read_block(fd, i) != ebsupload.ZERO_BLOCK}
    finally:
        os.close(fd)


@hyp_settings(max_examples=60, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, BLOCKS * BLOCK_SIZE - 1),
                                 st.integers(1, 3 * BLOCK_SIZE), st.booleans()), max_size=6),
       tail=st.integers(0, BLOCK_SIZE - 1))
def test_plan_sends_exactly_the_nonzero_blocks(tmp_path_factory, writes, tail):
    path = tmp_path_factory.mktemp("disk") / "d.raw"
    size = BLOCKS * BLOCK_SIZE - tail
    with open(path, "wb") as disk:
        disk.truncate(size)
        for offset, length, zeros in writes:
            length = min(length, size - offset)
            if length > 0:
                disk.seek(offset)
                disk.write(bytes(length) if zeros else b"\x01" * length)
    assert _sent_blocks(path) == _nonzero_blocks(path)


def test_last_short_block_is_padded(tmp_path):
    path = tmp_path / "d.raw"
    path.write_bytes(b"\x07" * (BLOCK_SIZE + 100))
    fd = os.open(path, os.O_RDONLY)
    try:
        last = ebsupload.read_block(fd, 1)
    finally:
        os.close(fd)
    assert len(last) == BLOCK_SIZE and last[:100] == b"\x07" * 100 and not any(last[100:])


def test_volume_size_is_whole_gib():
    assert ebsupload.volume_gib(1) == 1
    assert ebsupload.volume_gib(16 * 1024 ** 3) == 16
    assert ebsupload.volume_gib(16 * 1024 ** 3 + 1) == 17


def test_journal_survives_a_torn_last_line(tmp_path):
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"x")
    identity = ebsupload.disk_identity(raw)
    journal = ebsupload.Journal.create(raw, identity, "snap-1")
    journal.record(3, "c3")
    journal.record(1, "c1")
    with open(journal.path, "a") as handle:
        handle.write('{"i": 9, "sha2')  # the process died mid-write
    loaded = ebsupload.Journal.load(raw, identity)
    assert loaded.snapshot_id == "snap-1" and loaded.done == {3: "c3", 1: "c1"}
    assert not loaded.completed
    loaded.mark_completed()
    assert ebsupload.Journal.load(raw, identity).completed
    assert ebsupload.Journal.load(raw, {**identity, "size": 2}) is None
