"""The provisioned layer's cache key (tether.image.layer) and sparse hashing."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from tether.image import layer, packerrun
from tether.image.diskio import sha256_sparse

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the parts of the checkout the key reads."""
    dest = tmp_path / "checkout"
    shutil.copytree(ROOT / "ansible", dest / "ansible")
    shutil.copytree(ROOT / "packer", dest / "packer", ignore=shutil.ignore_patterns("plugins"))
    (dest / "agent").mkdir()
    for unit in layer.UNIT_FILES:
        shutil.copy(ROOT / unit, dest / unit)
    return dest


def _wheel(path: Path, members: dict[str, bytes], date=(2020, 1, 1, 0, 0, 0)) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=date), data)
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    _wheel(house / "tether-0.1.0-py3-none-any.whl", {"tether/__init__.py": b"x = 1\n"})
    _wheel(house / "dep-1.0-py3-none-any.whl", {"dep.py": b""})
    return house


def test_layer_is_every_role_before_the_per_image_ones():
    assert layer.layer_roles() == ["base", "agent", "firstboot", "harden"]
    assert layer.site_roles()[-3:] == list(layer.PER_IMAGE_ROLES)


def test_key_is_stable(checkout, wheels):
    assert layer.key("base1", wheels, checkout) == layer.key("base1", wheels, checkout)


def test_key_follows_the_base_disk(checkout, wheels):
    assert layer.key("base1", wheels, checkout) != layer.key("base2", wheels, checkout)


@pytest.mark.parametrize("role", ["base", "agent", "firstboot", "harden"])
def test_a_change_to_a_shared_role_changes_the_key(checkout, wheels, role):
    before = layer.key("b", wheels, checkout)
    defaults = checkout / "ansible" / "roles" / role / "defaults" / "main.yml"
    defaults.write_text(defaults.read_text() + "# changed\n")
    assert layer.key("b", wheels, checkout) != before


def test_a_new_file_in_a_shared_role_changes_the_key(checkout, wheels):
    before = layer.key("b", wheels, checkout)
    (checkout / "ansible" / "roles" / "harden" / "files" / "extra.txt").write_text("x")
    assert layer.key("b", wheels, checkout) != before


@pytest.mark.parametrize("name", ["ansible/site.yml", "ansible/ansible.cfg", "agent/tether-agent.service",
                                  "agent/tether-firstboot.service", "packer/qemu.pkr.hcl",
                                  "ansible/files/write_files.py"])
def test_a_change_to_an_input_file_changes_the_key(checkout, wheels, name):
    before = layer.key("b", wheels, checkout)
    path = checkout / name
    path.write_text(path.read_text() + "\n# changed\n")
    assert layer.key("b", wheels, checkout) != before


@pytest.mark.parametrize("role", list(layer.PER_IMAGE_ROLES))
def test_per_image_roles_do_not_change_the_key(checkout, wheels, role):
    before = layer.key("b", wheels, checkout)
    defaults = checkout / "ansible" / "roles" / role / "defaults" / "main.yml"
    defaults.write_text(defaults.read_text() + "# changed\n")
    assert layer.key("b", wheels, checkout) == before


def test_a_changed_agent_wheel_changes_the_key(checkout, wheels):
    before = layer.key("b", wheels, checkout)
    _wheel(wheels / "tether-0.1.0-py3-none-any.whl", {"tether/__init__.py": b"x = 2\n"})
    assert layer.key("b", wheels, checkout) != before


def test_a_rebuilt_identical_wheel_keeps_the_key(checkout, wheels):
    before = layer.key("b", wheels, checkout)
    _wheel(wheels / "tether-0.1.0-py3-none-any.whl", {"tether/__init__.py": b"x = 1\n"}, date=(2024, 5, 5, 5, 5, 6))
    assert layer.key("b", wheels, checkout) == before


def test_store_replaces_older_layers(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    old = layer.entry(cache, "a" * 64).path()
    old.write_bytes(b"old")
    (cache / "base-0000.raw").write_bytes(b"base")
    disk = tmp_path / "new.img"
    disk.write_bytes(b"new")
    new = layer.entry(cache, "b" * 64)
    with new.publishing() as out:
        os.replace(disk, out[".raw"])
    stored = new.path()
    assert stored == cache / f"provisioned-{'b' * 16}.raw" and stored.read_bytes() == b"new"
    assert not old.exists() and (cache / "base-0000.raw").exists()


def test_layer_timeline_has_no_sysprep():
    tl = packerrun.Timeline(start=0.0, markers=packerrun.LAYER_MARKERS)
    tl.feed(20.0, "==> qemu.tether: Connected to SSH!")
    tl.feed(100.0, "==> qemu.tether: Gracefully halting virtual machine...")
    tl.end = 110.0
    assert tl.durations() == {"packer_boot": 20.0, "ansible": 80.0, "shutdown": 10.0}


def test_sha256_sparse_equals_reading_everything(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as handle:
        handle.truncate(7 * 1024 * 1024 + 123)
        handle.seek(3 * 1024 * 1024 + 5)
        handle.write(os.urandom(200_000))
        handle.seek(6 * 1024 * 1024)
        handle.write(b"tail" * 1000)
    assert sha256_sparse(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("content", [b"", b"abc", bytes(5000)])
def test_sha256_sparse_small_files(tmp_path, content):
    path = tmp_path / "f"
    path.write_bytes(content)
    assert sha256_sparse(path) == hashlib.sha256(content).hexdigest()


def test_sha256_sparse_all_hole(tmp_path):
    path = tmp_path / "hole"
    with open(path, "wb") as handle:
        handle.truncate(3 * 1024 * 1024 + 7)
    assert sha256_sparse(path) == hashlib.sha256(bytes(3 * 1024 * 1024 + 7)).hexdigest()


def test_sysprep_removes_exactly_the_build_holds():
    import yaml

    from tether.image import builddisk

    defaults = yaml.safe_load((ROOT / "ansible/roles/sysprep/defaults/main.yml").read_text())
    assert sorted(defaults["sysprep_build_holds"]) == sorted(builddisk.hold_paths())
    assert "ConditionPathExists=/nonexistent/" in builddisk.hold_dropin()


def test_the_readme_in_the_wheel_metadata_does_not_change_the_key(checkout, wheels):
    meta = "tether-0.1.0.dist-info/METADATA"
    _wheel(wheels / "tether-0.1.0-py3-none-any.whl",
           {"tether/__init__.py": b"x = 1\n", meta: b"Name: tether\nVersion: 0.1.0\n\n# README one\n"})
    before = layer.key("b", wheels, checkout)
    _wheel(wheels / "tether-0.1.0-py3-none-any.whl",
           {"tether/__init__.py": b"x = 1\n", meta: b"Name: tether\nVersion: 0.1.0\n\n# README two\n"})
    assert layer.key("b", wheels, checkout) == before
    _wheel(wheels / "tether-0.1.0-py3-none-any.whl",
           {"tether/__init__.py": b"x = 1\n", meta: b"Name: tether\nVersion: 0.2.0\n\n# README two\n"})
    assert layer.key("b", wheels, checkout) != before
