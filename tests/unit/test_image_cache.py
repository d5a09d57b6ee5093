"""The one build cache: entries named by a key of a stage's inputs, published whole or not at all."""

import pytest

from tether.image.cache import Entry


def test_entry_is_ready_only_when_every_output_is_there(tmp_path):
    entry = Entry(tmp_path, "base", "ab" * 32, (".raw", ".vmlinuz"))
    assert entry.path(".raw") == tmp_path / f"base-{'ab' * 8}.raw" and entry.path() == entry.path(".raw")
    entry.path(".raw").write_bytes(b"disk")
    assert not entry.ready()
    entry.path(".vmlinuz").write_bytes(b"kernel")
    assert entry.ready()


def test_publishing_renames_into_place_and_prunes_other_keys_of_the_kind(tmp_path):
    old = Entry(tmp_path, "base", "0" * 64, (".raw", ".vmlinuz"))
    for suffix in old.suffixes:
        old.path(suffix).write_bytes(b"old")
    other_kind = tmp_path / f"provisioned-{'0' * 16}.raw"
    other_kind.write_bytes(b"layer")
    new = Entry(tmp_path, "base", "1" * 64, (".raw", ".vmlinuz"))
    with new.publishing() as out:
        assert not new.ready() and all(p.name.startswith(".") for p in out.values())
        out[".raw"].write_bytes(b"disk")
        out[".vmlinuz"].write_bytes(b"kernel")
    assert new.ready() and new.path(".raw").read_bytes() == b"disk"
    assert not old.path(".raw").exists() and not old.path(".vmlinuz").exists() and other_kind.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([new.path(".raw").name, new.path(".vmlinuz").name,
                                                                 other_kind.name])


def test_a_failed_stage_leaves_the_cache_as_it_was(tmp_path):
    old = Entry(tmp_path, "wheels", "2" * 16)
    old.path().mkdir()
    new = Entry(tmp_path, "wheels", "3" * 16)
    with pytest.raises(RuntimeError), new.publishing() as out:
        out[""].mkdir()
        (out[""] / "half.whl").write_bytes(b"x")
        raise RuntimeError("download failed")
    assert not new.ready() and old.ready() and [p.name for p in tmp_path.iterdir()] == [old.path().name]


def test_an_output_the_stage_did_not_write_is_an_error(tmp_path):
    entry = Entry(tmp_path, "accel", "4" * 64, (".json",))
    with pytest.raises(FileNotFoundError, match="wrote no"), entry.publishing():
        pass
    assert not entry.ready()
