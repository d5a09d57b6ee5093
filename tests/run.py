#!/usr/bin/env python3
"""Run the whole test suite the way CI does (`make test`).

Why a driver and not one pytest call: the image checks need an image, and
building one is a long step of its own (debootstrap, Packer, Ansible) that must
show its progress and may be reused. So the suite runs in stages:

1. unit and integration tests (no VM);
2. an image: the one named by TETHER_TEST_IMAGE, else a fresh `make image`
   build (the cached base disk is reused when present);
3. the image checks (testinfra against the finished disk) and the tests that
   boot it, pointed at that image.

Each stage is a pytest run with a JUnit report; at the end one closing line
sums them up. pytest's exit 5 ("no tests collected") counts as an empty stage,
not a failure, so a stage that has no tests yet does not break CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "build" / "test-reports"
PYTEST_NO_TESTS = 5


@dataclass
class Tally:
    """Counts summed over every stage, for the closing line CI reads."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failed_stages: list[str] = field(default_factory=list)

    def add_report(self, report: Path) -> None:
        if not report.exists():
            return
        root = ET.parse(report).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        for suite in suites:
            tests = int(suite.get("tests", 0))
            failures = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skipped = int(suite.get("skipped", 0))
            self.failed += failures
            self.skipped += skipped
            self.passed += tests - failures - skipped


def run_pytest(stage: str, args: list[str], tally: Tally) -> None:
    """Run one pytest stage and add its counts; a crash of pytest is a failure."""
    REPORTS.mkdir(parents=True, exist_ok=True)
    report = REPORTS / f"{stage}.xml"
    report.unlink(missing_ok=True)
    print(f"\n=== test stage: {stage} ===", flush=True)
    started = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", f"--junitxml={report}", "-p", "no:cacheprovider", *args]
    code = subprocess.call(cmd, cwd=ROOT)
    took = time.monotonic() - started
    if code == PYTEST_NO_TESTS:
        print(f"=== {stage}: no tests collected ({took:.0f} s) ===", flush=True)
        return
    tally.add_report(report)
    if code != 0:
        tally.failed_stages.append(stage)
        if not report.exists():
            tally.failed += 1  # pytest died before writing its report
    print(f"=== {stage}: exit {code} ({took:.0f} s) ===", flush=True)


def image_for_tests(tally: Tally) -> str | None:
    """Name of the image the image stages test: given, or built now."""
    given = os.environ.get("TETHER_TEST_IMAGE")
    if given:
        return given
    if os.environ.get("TETHER_SKIP_IMAGE") == "1":
        print("=== image stages skipped: TETHER_SKIP_IMAGE=1 ===", flush=True)
        return None
    name = "test-" + time.strftime("%Y%m%d-%H%M%S")
    print(f"\n=== test stage: build image {name} (make image) ===", flush=True)
    cmd = [sys.executable, "-m", "tether.image.cli", "build", "--name", name]
    if subprocess.call(cmd, cwd=ROOT) != 0:
        tally.failed_stages.append("image build")
        tally.failed += 1
        return None
    tally.passed += 1
    return name


def main() -> int:
    tally = Tally()
    run_pytest("unit", ["tests/unit"], tally)
    run_pytest("integration", ["tests/integration"], tally)
    image = image_for_tests(tally)
    if image:
        image_dir = str(ROOT / "images" / image)
        run_pytest("image", ["tests/image", f"--image-dir={image_dir}"], tally)
        if (ROOT / "tests" / "e2e").is_dir() and any((ROOT / "tests" / "e2e").glob("test_*.py")):
            run_pytest("e2e", ["tests/e2e", f"--image-dir={image_dir}"], tally)
    print()
    if tally.failed_stages:
        print("failed stages: " + ", ".join(tally.failed_stages))
    print(f"{tally.passed} passed, {tally.failed} failed, {tally.skipped} skipped")
    return 1 if tally.failed_stages or tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
