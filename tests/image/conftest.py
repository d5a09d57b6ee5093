"""Fixtures for the checks of a finished image (pytest-testinfra, read-only).

`--image-dir images/<name>/` names the image; its `<name>.raw` is attached
read-only (losetup -r --partscan), root-a and data are found by label and
mounted read-only, and the checks run through testinfra's chroot backend.
Everything is detached again at the end, also when a check fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import testinfra


def pytest_addoption(parser: pytest.Parser) -> None:
    try:
        parser.addoption(
            "--image-dir", action="store", default=os.environ.get("TETHER_IMAGE_DIR"),
            help="images/<name>/ of a finished build (default: $TETHER_IMAGE_DIR)")
    except ValueError:
        pass  # another conftest (tests/e2e) declares the same option


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


@pytest.fixture(scope="session")
def image_dir(request: pytest.FixtureRequest) -> Path:
    value = request.config.getoption("--image-dir")
    if not value:
        pytest.skip("no image given: pass --image-dir images/<name>/ (or run make verify NAME=...)")
    path = Path(value).resolve()
    if not path.is_dir():
        pytest.fail(f"--image-dir {path} is not a directory: ls images/ for built images")
    return path


@pytest.fixture(scope="session")
def image_name(image_dir: Path) -> str:
    return image_dir.name


@pytest.fixture(scope="session")
def raw_disk(image_dir: Path, image_name: str) -> Path:
    raw = image_dir / f"{image_name}.raw"
    if not raw.is_file():
        pytest.fail(f"{raw} not found: the build did not finish; run make image again")
    return raw


@pytest.fixture(scope="session")
def manifest(image_dir: Path) -> dict | None:
    path = image_dir / "manifest.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _labels(disk) -> dict[str, str]:
    """Partition devices of the attached disk by filesystem label (PARTLABEL as fallback)."""
    labels: dict[str, str] = {}
    for sysdir in sorted(Path("/sys/block", disk.name).glob(f"{disk.name}p*")):
        dev = f"/dev/{sysdir.name}"
        probe = subprocess.run(["blkid", "-p", "-o", "export", dev], capture_output=True, text=True, check=False)
        fields = dict(line.split("=", 1) for line in probe.stdout.splitlines() if "=" in line)
        for key in ("LABEL", "PART_ENTRY_NAME"):
            if fields.get(key):
                labels.setdefault(fields[key], dev)
    return labels


@pytest.fixture(scope="session")
def image_root(raw_disk: Path) -> Iterator[Path]:
    """root-a of the image mounted read-only, with the data partition on /data."""
    if os.geteuid() != 0:
        pytest.fail("the image checks attach the disk with losetup: run them as root")
    # The build's own loop helper: --partscan, and device nodes made from /sys
    # where no udev runs (containers); detached and cleaned up on exit.
    from tether.image.diskio import attached
    from tether.image.layout import plan

    mounts: list[Path] = []
    tmp = Path(tempfile.mkdtemp(prefix="tether-image-"))
    try:
        with attached(raw_disk, partitions=len(plan().partitions), read_only=True) as disk:
            try:
                labels = _labels(disk)
                missing = [label for label in ("root-a", "data") if label not in labels]
                if missing:
                    pytest.fail(f"{raw_disk} has no partition labelled {', '.join(missing)} "
                                f"(found {sorted(labels)}): not a tether disk (docs/CONTRACTS.md)")
                # noload: do not replay the ext4 journal on a read-only device. No nodev:
                # commands in the chroot write to the image's /dev/null.
                # The boot partition (grub.cfg, grubenv) is mounted on /boot/grub, as on the appliance.
                for label, where in (("root-a", tmp), ("data", tmp / "data"), ("boot", tmp / "boot/grub")):
                    if label not in labels:
                        pytest.fail(f"{raw_disk} has no partition labelled {label} (docs/CONTRACTS.md)")
                    _run(["mount", "-o", "ro,noload,nosuid", labels[label], str(where)])
                    mounts.append(where)
                yield tmp
            finally:
                for where in reversed(mounts):
                    subprocess.run(["umount", str(where)], check=False)
    finally:
        if tmp.exists() and not any(tmp.iterdir()):
            tmp.rmdir()


@pytest.fixture(scope="session")
def host(image_root: Path):
    """A testinfra host that runs commands in the image (chroot backend)."""
    return testinfra.get_host(str(image_root), connection="chroot")
