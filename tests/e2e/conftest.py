"""Fixtures for the boot tests: the image under test, the accelerator, boot timings.

``--image-dir images/<name>/`` names a finished image (default
$TETHER_IMAGE_DIR); ``--home-state`` the home state it was built with
(default: images/.home next to it). Without an image the boot tests skip and
say how to get one; the launcher and first-boot unit tests here run anyway.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bootrun import TIMINGS, BootImage, extract_vmdk, load_image
from homerig import RigError
import vm


ROOT = Path(__file__).resolve().parents[2]


def pytest_addoption(parser: pytest.Parser) -> None:
    for flag, kwargs in (
        ("--image-dir", {"default": os.environ.get("TETHER_IMAGE_DIR"),
                         "help": "images/<name>/ of a finished build (default: $TETHER_IMAGE_DIR)"}),
        ("--home-state", {"default": os.environ.get("TETHER_HOME_STATE_FOR_IMAGE"),
                          "help": "home state the image was built with (default: images/.home)"}),
        ("--boot-disk", {"default": "raw", "choices": ["raw", "vmdk"],
                         "help": "boot <name>.raw, or the VMDK inside <name>.ova"}),
        ("--boot-timeout", {"default": "900",
                            "help": "seconds to wait for enrollment (TCG is slow)"}),
    ):
        try:
            parser.addoption(flag, action="store", **kwargs)
        except ValueError:
            pass  # declared by another conftest (tests/image) in the same run


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM ends the run like Ctrl-C, so fixtures still stop the VM and home."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def boot_image(request: pytest.FixtureRequest, tmp_path_factory) -> BootImage:
    value = request.config.getoption("--image-dir")
    if not value:
        pytest.skip("no image given: pass --image-dir images/<name>/ "
                    "(make boot-test NAME=<name>; build one with make image)")
    image_dir = Path(value).resolve()
    if not image_dir.is_dir():
        pytest.fail(f"--image-dir {image_dir} is not a directory: ls images/ for built images")
    state = request.config.getoption("--home-state")
    try:
        image = load_image(image_dir, Path(state).resolve() if state else None)
        if request.config.getoption("--boot-disk") == "vmdk":
            image = extract_vmdk(image, tmp_path_factory.mktemp("vmdk"))
        return image
    except RigError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def boot_timeout(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--boot-timeout"))


@pytest.fixture(scope="session")
def accelerator() -> str:
    """kvm only when the image build's probe booted a kernel with it; else tcg."""
    return vm.choose_accelerator(ROOT / "images" / ".cache").accelerator


def pytest_terminal_summary(terminalreporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("boot timings (seconds from qemu start)")
    for name, figures in TIMINGS:
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
