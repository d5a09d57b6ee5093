"""Run `packer build` over packer/ through packer-py, with live progress.

packer-py (packerpy.PackerExecutable) works with Debian's packer 1.6.6, but
it collects output with Popen.communicate(), which would keep a 5-minute
build silent until the end. Its `config` lets us give the child a pipe as
stdout, so packer-py runs in a thread while this module reads the pipe:
each machine-readable line is turned back into Packer's own text, printed
as it arrives, and timed (boot, ansible, sysprep, shutdown) for the summary
and the benchmark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import BuildError

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "packer"


def unescape(data: str) -> str:
    """Undo Packer's machine-readable escaping of commas and newlines."""
    return data.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "\r")


def parse_line(line: str) -> tuple[float, str, str] | None:
    """(timestamp, kind, text) of a machine-readable `ui` line, else None.

    Lines look like `1606312345,,ui,say,==> qemu.tether: Starting VM...`;
    `kind` is say / message / error.
    """
    parts = line.rstrip("\n").split(",", 4)
    if len(parts) < 5 or parts[2] != "ui":
        return None
    try:
        ts = float(parts[0])
    except ValueError:
        return None
    return ts, parts[3], unescape(parts[4])


#: (stage that ends, text that ends it); each marks the start of the next.
MARKERS = (
    ("packer_boot", "Connected to SSH!"),
    ("ansible", "TASK [sysprep"),
    ("sysprep", "Gracefully halting virtual machine"),
)
#: The layer's run (shared roles only, no sysprep): boot, Ansible, shutdown.
LAYER_MARKERS = (
    ("packer_boot", "Connected to SSH!"),
    ("ansible", "Gracefully halting virtual machine"),
)


#: Ansible's lines that say why a task failed (shown in the build's error).
ERROR_MARKS = ("fatal: [", "[ERROR]", "FAILED!", "    msg:", "UNREACHABLE!")
SOURCE_PREFIX = "qemu.tether:"


@dataclass
class Timeline:
    """Splits Packer's run into stages by the first message of each."""

    start: float
    marks: dict[str, float] = field(default_factory=dict)
    end: float | None = None
    markers: tuple[tuple[str, str], ...] = MARKERS

    def feed(self, ts: float, text: str) -> None:
        for stage, marker in self.markers:
            if stage not in self.marks and marker in text:
                self.marks[stage] = ts

    def durations(self) -> dict[str, float]:
        """Seconds per stage; the stage after the last mark runs to `end`."""
        out, prev = {}, self.start
        names = [m[0] for m in self.markers] + ["shutdown"]
        points = [self.marks.get(m[0]) for m in self.markers] + [self.end]
        for name, point in zip(names, points):
            if point is None:
                break
            out[name] = max(0.0, point - prev)
            prev = point
        return out


@dataclass
class PackerResult:
    returncode: int
    timeline: Timeline
    errors: list[str]
    tail: list[str]


#: Packer's words for a missing plugin (modern Packer ships no builders).
_PLUGIN_ERRORS = ("Unknown source type", "unknown source type", "Unknown provisioner type",
                  "unknown provisioner type", "installed plugin", "packer init")


def hint(lines: list[str]) -> str | None:
    """What to do about a failure Packer's own words do not explain."""
    text = "\n".join(lines)
    if any(marker in text for marker in _PLUGIN_ERRORS):
        return ("this Packer lacks the qemu/amazon/ansible plugins: run "
                "`packer init packer/plugins` once (modern Packer), or use Debian's packer 1.6.6")
    if "Timeout waiting for SSH" in text:
        return "the guest never answered SSH: look at the guest console log (serial.log)"
    return None


def packer_binary() -> str:
    path = shutil.which("packer")
    if not path:
        raise BuildError("packer not found: install the Debian package 'packer' (make deps)")
    return path


def _executable(stdout_fd: int):
    try:
        from packerpy import PackerExecutable
    except ImportError as exc:
        raise BuildError("packer-py is not installed in the venv: run `make deps`") from exc
    return PackerExecutable(executable_path=packer_binary(), machine_readable=True,
                            config={"stdout": stdout_fd, "stderr": subprocess.STDOUT})


def build(variables: dict[str, str], only: str = "qemu.tether", say: Callable[[str], None] = print,
          template_dir: Path = TEMPLATE_DIR, cache_dir: Path | None = None,
          markers: tuple[tuple[str, str], ...] = MARKERS) -> PackerResult:
    """`packer build -only=<only> -var k=v ... packer/`, streamed and timed.

    cache_dir: Packer's download cache (PACKER_CACHE_DIR); by default Packer
    would create packer_cache/ in the current directory.
    """
    os.environ["CHECKPOINT_DISABLE"] = "1"  # no calls home to HashiCorp
    if cache_dir is not None:
        os.environ["PACKER_CACHE_DIR"] = str(cache_dir)
    read_fd, write_fd = os.pipe()
    packer = _executable(write_fd)
    outcome: dict = {}

    def _run() -> None:
        try:
            outcome["rc"] = packer.build(str(template_dir), only=only, var=variables)[0]
        except BaseException as exc:  # reported by the main thread
            outcome["exc"] = exc
        finally:
            os.close(write_fd)

    timeline = Timeline(start=time.time(), markers=markers)
    errors: list[str] = []
    tail: list[str] = []
    worker = threading.Thread(target=_run, name="packer", daemon=True)
    worker.start()
    with os.fdopen(read_fd, "r", errors="replace") as stream:
        for line in stream:
            _handle(line, timeline, errors, tail, say)
    worker.join()
    timeline.end = time.time()
    if "exc" in outcome:
        raise BuildError(f"could not run packer: {outcome['exc']}")
    return PackerResult(outcome.get("rc", 1), timeline, errors, tail)


def _handle(line: str, timeline: Timeline, errors: list[str], tail: list[str], say) -> None:
    parsed = parse_line(line)
    if parsed is None:
        if line.strip() and "," not in line[:12]:  # plain text (e.g. a crash)
            tail.append(line.rstrip())
        return
    ts, kind, text = parsed
    timeline.feed(ts, text)
    for piece in text.splitlines() or [""]:
        if not piece.strip():
            continue
        tail.append(piece)
        if kind == "error" or any(mark in piece for mark in ERROR_MARKS):
            errors.append(piece.replace(f"{SOURCE_PREFIX}", "").strip())
        say(piece)
    del tail[:-60]


def validate(variables: dict[str, str], template_dir: Path = TEMPLATE_DIR) -> tuple[int, str]:
    """`packer validate` through packer-py (used by the tests)."""
    os.environ["CHECKPOINT_DISABLE"] = "1"
    from packerpy import PackerExecutable

    exe = PackerExecutable(executable_path=packer_binary(), machine_readable=False)
    rc, out, err = exe.validate(str(template_dir), var=variables)
    return rc, (out or b"").decode() + (err or b"").decode()
