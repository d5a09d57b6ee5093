"""Verification of a finished image: the checks in tests/image, as a build step.

The checks themselves (pytest-testinfra through the chroot backend, plus the
OVA and manifest checks) belong to tests/image/; this module runs them on one
image folder and turns a failure into a BuildError that lists every failed
check by name, so `make image` fails with the list, not with "exit 1".
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .errors import BuildError

CHECKOUT = Path(__file__).resolve().parents[2]
TESTS = CHECKOUT / "tests" / "image"


def failed_checks(junit_xml: Path) -> list[str]:
    """'test id: first line of the reason' for every failed or erroring check."""
    if not junit_xml.is_file():
        return []
    failed = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                reason = (node.get("message") or node.text or kind).strip().splitlines()
                failed.append(f"{case.get('classname', '')}::{case.get('name', '')}: {reason[0] if reason else kind}")
    return failed


def pytest_command(image_dir: Path, junit_xml: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", str(TESTS), "--image-dir", str(image_dir),
            "-p", "no:cacheprovider", "-q", "-rfE", f"--junitxml={junit_xml}"]


def check(image_dir: Path, junit_xml: Path, say=print) -> None:
    """Run the image checks on `image_dir`; BuildError lists what failed."""
    if not TESTS.is_dir():
        raise BuildError(f"{TESTS} is missing: the image checks belong to the checkout")
    junit_xml.unlink(missing_ok=True)
    proc = subprocess.Popen(pytest_command(image_dir, junit_xml), cwd=CHECKOUT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        say(line.rstrip())
    rc = proc.wait()
    if rc == 0:
        return
    failed = failed_checks(junit_xml)
    if rc == 5 or (not failed and rc == 0):
        raise BuildError(f"no image checks ran in {TESTS}: the image is unverified")
    listing = "\n    ".join(failed) if failed else f"pytest exit {rc} (see its output above)"
    raise BuildError(f"image checks failed for {image_dir.name} ({len(failed)}):\n    {listing}")
