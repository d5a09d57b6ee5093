"""tether.atomicfile: the old content or the new, never half, and no litter on failure."""

from __future__ import annotations

import stat

import pytest

from tether.atomicfile import replacing, write_atomic


def test_write_atomic_replaces_with_mode_text_or_bytes(tmp_path):
    target = tmp_path / "f.json"
    write_atomic(target, "one")
    assert target.read_text() == "one" and stat.S_IMODE(target.stat().st_mode) == 0o600
    write_atomic(target, b"two", mode=0o644, durable=False)
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_replacing_leaves_the_old_file_and_no_temporary_when_the_writer_fails(tmp_path):
    target = tmp_path / "disk.raw"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the tool failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["disk.raw"]


def test_two_writers_get_different_temporary_paths(tmp_path):
    target = tmp_path / "x"
    with replacing(target) as first, replacing(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("1")
        second.write_text("2")
    assert target.read_text() == "1"  # the outer block ends last: its content wins
