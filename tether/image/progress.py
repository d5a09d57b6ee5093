"""Stage-by-stage progress and timing of a build.

Every stage says what it does when it starts and how long it took when it
ends; the recorded durations feed the build summary, build-times.json in the
image folder and bench/build.py (which needs the same figures cold and warm).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, TextIO


def fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s"


def fmt_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass
class Progress:
    """Prints stage banners and keeps each stage's duration (seconds)."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    times: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def say(self, message: str) -> None:
        print(f"    {message}", file=self.out, flush=True)

    def record(self, name: str, seconds: float) -> None:
        """Add a duration measured elsewhere (e.g. parsed from Packer's log)."""
        self.times[name] = self.times.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        print(f"==> [{name}] {what}", file=self.out, flush=True)
        t0 = time.monotonic()
        try:
            yield
        except BaseException:
            print(f"==> [{name}] FAILED after {fmt_seconds(time.monotonic() - t0)}", file=self.out, flush=True)
            raise
        took = time.monotonic() - t0
        self.record(name, took)
        print(f"==> [{name}] done in {fmt_seconds(took)}", file=self.out, flush=True)

    def total(self) -> float:
        return time.monotonic() - self.started
