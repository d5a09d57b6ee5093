"""Base disk cache key, package list parsing and the kernel driver check."""

import dataclasses

import pytest

from tether.image import basedisk, layout
from tether.image.errors import BuildError


def _inputs(**changes):
    base = basedisk.BaseInputs(packages=("python3", "grub-pc"), layout=layout.plan())
    return dataclasses.replace(base, **changes)


def test_same_inputs_same_key_regardless_of_package_order():
    assert _inputs().key() == _inputs(packages=("grub-pc", "python3")).key()


@pytest.mark.parametrize("change", [
    {"packages": ("python3", "grub-pc", "nftables")},
    {"layout": layout.plan(swap_size=2 * layout.GIB)},
    {"suite": "trixie"},
    {"variant": "buildd"},
    {"step_version": "999"},
])
def test_any_input_change_changes_the_key(change):
    assert _inputs(**change).key() != _inputs().key()


def test_boot_files_are_part_of_the_key(monkeypatch):
    before = _inputs().key()
    monkeypatch.setattr(basedisk.bootconf, "fstab", lambda: "changed\n")
    assert _inputs().key() != before


def test_package_list_parsing(tmp_path):
    f = tmp_path / "packages.txt"
    f.write_text("# comment\nlinux-image-cloud-amd64\n\n  python3   # runtime\n")
    assert basedisk.read_packages(f) == ["linux-image-cloud-amd64", "python3"]
    f.write_text("# nothing\n")
    with pytest.raises(BuildError, match="lists no packages"):
        basedisk.read_packages(f)


def test_shipped_package_list_has_what_the_image_needs():
    names = set(basedisk.read_packages())
    for needed in ("linux-image-cloud-amd64", "grub-pc", "systemd-sysv", "systemd-timesyncd", "nftables",
                   "python3", "python3-venv", "openssh-server", "ca-certificates", "open-vm-tools",
                   "iproute2", "udev", "kmod", "e2fsprogs", "dbus", "python3-apt"):
        assert needed in names
    assert "linux-image-amd64" not in names


def test_kernel_module_found_as_file_or_builtin(tmp_path):
    tree = tmp_path / "6.1.0-cloud-amd64"
    (tree / "kernel/drivers/net/vmxnet3").mkdir(parents=True)
    (tree / "kernel/drivers/net/vmxnet3/vmxnet3.ko.xz").write_bytes(b"")
    (tree / "modules.builtin").write_text("kernel/drivers/nvme/host/nvme.ko\nkernel/drivers/nvme/host/nvme-core.ko\n")
    assert basedisk.kernel_has_module(tree, "vmxnet3")
    assert basedisk.kernel_has_module(tree, "nvme")
    assert not basedisk.kernel_has_module(tree, "mptspi")


def test_debootstrap_output_is_condensed():
    lines = ["I: Retrieving InRelease \n", "I: Checking Release signature\n"]
    lines += [f"I: Retrieving pkg{i} 1.0\n" for i in range(100)]
    lines += [f"I: Configuring pkg{i}...\n" for i in range(50)]
    lines += ["I: Unpacking required packages...\n", "W: something odd\n"]
    log = []
    shown = list(basedisk._progress_lines(iter(lines), log))
    assert len(log) == len(lines)
    assert "debootstrap: Checking Release signature" in shown
    assert sum("retrieving packages" in s for s in shown) == 4  # 1, 41, 81 + InRelease
    assert sum("configuring packages" in s for s in shown) == 2  # 1, 41
    assert "debootstrap: Unpacking required packages..." in shown
    assert "debootstrap: something odd" in shown


def test_slim_keeps_copyrights_and_drops_docs_and_translations(tmp_path):
    for rel in ("usr/share/doc/bash/copyright", "usr/share/doc/bash/README.gz", "usr/share/man/man1/ls.1.gz",
                "usr/share/locale/de/LC_MESSAGES/x.mo", "usr/share/locale/locale.alias", "usr/bin/bash"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True)
    basedisk._slim(tmp_path)
    remaining = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert remaining == ["etc/dpkg/dpkg.cfg.d/01-tether-slim", "usr/bin/bash",
                         "usr/share/doc/bash/copyright", "usr/share/locale/locale.alias"]
    assert "path-exclude=/usr/share/doc/*" in (tmp_path / "etc/dpkg/dpkg.cfg.d/01-tether-slim").read_text()
