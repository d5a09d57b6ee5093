#!/usr/bin/env python3
"""Run every benchmark in bench/ one after another (`make bench`).

Each benchmark is a script that prints its figures and writes them to
bench/results/<name>.json; this runner only sequences them (so they do not
compete for the two cores) and says which ones failed. BENCH=name,name
limits the run to some of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def selected_benchmarks() -> list[Path]:
    """The bench scripts to run: all of them, or those named in $BENCH."""
    scripts = sorted(p for p in BENCH_DIR.glob("*.py") if p.name != "run.py")
    wanted = {w.strip() for w in os.environ.get("BENCH", "").split(",") if w.strip()}
    if wanted:
        unknown = wanted - {p.stem for p in scripts}
        if unknown:
            sys.exit(f"bench: no benchmark named {', '.join(sorted(unknown))}; "
                     f"have: {', '.join(p.stem for p in scripts)}")
        scripts = [p for p in scripts if p.stem in wanted]
    return scripts


def main() -> int:
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    failed = []
    for script in selected_benchmarks():
        print(f"\n=== bench: {script.stem} ===", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(script)], cwd=BENCH_DIR.parent)
        print(f"=== bench {script.stem}: exit {code} ({time.monotonic() - started:.0f} s) ===", flush=True)
        if code:
            failed.append(script.stem)
    if failed:
        print("benchmarks that failed: " + ", ".join(failed))
        return 1
    print("figures written to bench/results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
