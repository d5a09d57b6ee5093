#!/usr/bin/env python3
"""Before and after a restructuring, in one run: agent idle RSS and channel round trip.

Issue 13 reshapes the wire layer and the agent "with no change of behaviour"; the
proof that it did not cost memory or latency is the same measurement of the old and
the new code on the same machine at the same time (these machines are noisy, so two
runs an hour apart prove nothing). This script exports a baseline revision and this
working tree side by side, installs each into its own site directory, and runs each
tree's own ``bench/channel.py`` (small fleet) alternately, ``--rounds`` times each:

* ``agent_rss_idle_mb`` / ``agent_uss_idle_mb``: a real ``tether-agent run`` process,
  idle with its sockets up (issue 13's goal: <= 35 MB RSS);
* ``round_trip_ms`` p50/p99: request -> response through one channel socket.

Figures (median over rounds per side, and after/before ratios) are printed and written
to bench/results/shape.json. Each side runs with ``PYTHONPATH`` set to its own install,
so both use this venv's interpreter and third-party packages: only our code differs.

Usage: ``.venv/bin/python bench/shape.py [--baseline 7493e46] [--rounds 2] [--agents 20]``.
Everything talks to 127.0.0.1 only. About 2 minutes a round on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "shape.json"
#: the last commit before issue 13's restructuring
DEFAULT_BASELINE = "7493e46"


def export_revision(revision: str, dest: Path) -> None:
    """The tracked files of ``revision`` into ``dest`` (no checkout, no worktree)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def export_working_tree(dest: Path) -> None:
    """The files of this working tree as they are now (tracked and new, not ignored)."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard",
                              "-z"], check=True, capture_output=True).stdout
    for name in filter(None, listing.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def install(tree: Path, site: Path) -> None:
    """A plain (non-editable) install of ``tree``'s package into ``site``, no dependencies."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check",
                    "--target", str(site), str(tree)], check=True)
    # Our editable install must not win over PYTHONPATH, or both sides measure this tree.
    probe = "import tether.agent; print(tether.agent.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(site)},
                           cwd=site, capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(site)):
        raise SystemExit(f"shape: {tree.name} resolves tether.agent to {where}, not its own "
                         f"install; uninstall other copies of tether from this venv")


def measure(tree: Path, site: Path, agents: int, log: Path) -> dict:
    """Run ``tree``'s channel bench against its own code; the figures it wrote."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    command = [sys.executable, str(tree / "bench" / "channel.py"), "--agents", str(agents),
               "--hold", "2", "--hostile-frames", "200"]
    with open(log, "ab") as out:
        code = subprocess.call(command, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"shape: {tree.name}'s bench/channel.py failed (exit {code}); "
                         f"see {log}")
    figures = json.loads((tree / "bench" / "results" / "channel.json").read_text())
    return {"agent_rss_idle_mb": figures["agent_rss_idle_mb"],
            "agent_uss_idle_mb": figures.get("agent_uss_idle_mb"),
            "round_trip_p50_ms": figures["round_trip_ms"]["p50_ms"],
            "round_trip_p99_ms": figures["round_trip_ms"]["p99_ms"]}


def summarise(samples: list[dict]) -> dict:
    return {key: round(statistics.median(s[key] for s in samples), 3)
            for key in samples[0] if samples[0][key] is not None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help="git revision measured as 'before' (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--agents", type=int, default=20)
    args = parser.parse_args()
    baseline = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                              capture_output=True, text=True)
    if baseline.returncode:
        return f"shape: {args.baseline!r} is not a revision of this repository; " \
               f"give --baseline a commit id or branch name"
    results: dict = {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
                     "baseline": baseline.stdout.strip(), "rounds": args.rounds,
                     "agents": args.agents}
    with tempfile.TemporaryDirectory(prefix="tether-shape-") as tmpdir:
        tmp = Path(tmpdir)
        sides = {"before": tmp / "before", "after": tmp / "after"}
        print(f"shape: exporting {results['baseline']} and this working tree", flush=True)
        export_revision(args.baseline, sides["before"])
        sides["after"].mkdir()
        export_working_tree(sides["after"])
        for name, tree in sides.items():
            print(f"shape: installing {name} into its own site directory", flush=True)
            install(tree, tmp / f"{name}-site")
        samples: dict[str, list[dict]] = {name: [] for name in sides}
        for round_no in range(1, args.rounds + 1):
            for name, tree in sides.items():
                started = time.monotonic()
                print(f"shape: round {round_no}/{args.rounds}, {name} ...", end="", flush=True)
                figures = measure(tree, tmp / f"{name}-site", args.agents, tmp / f"{name}.log")
                samples[name].append(figures)
                print(f" {time.monotonic() - started:.0f} s: {figures}", flush=True)
        for name in sides:
            results[name] = summarise(samples[name])
            results[f"{name}_samples"] = samples[name]
    results["after_over_before"] = {
        key: round(results["after"][key] / results["before"][key], 3)
        for key in results["after"] if results["before"].get(key)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("before", "after", "after_over_before")},
                     indent=2))
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
