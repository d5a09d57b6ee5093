#!/usr/bin/env python3
"""Benchmark of `make image`: every stage, cold and warm, and artifact sizes.

cold: a fresh images directory (no base disk, no debootstrap package cache,
      no accelerator probe result, no home state), as on a new machine;
warm: a second build in that same directory (everything cached: base disk,
      provisioned layer, wheels, accelerator probe).
deps: `make deps` on this machine (the idempotent check when installed).

Figures are printed and written to bench/results/build.json. The builds go
to a scratch images directory (BENCH_IMAGES_DIR, default images/.bench) so
the user's images/ and its cache stay untouched; it is removed at the end
unless BENCH_KEEP=1. BENCH_BUILD_RUNS=warm skips the cold build; with
BENCH_IMAGES_DIR=images it then measures a warm build against the user's
own cache (that directory is never deleted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tether.image import build  # noqa: E402
from tether.image.progress import Progress, fmt_bytes, fmt_seconds  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "build.json"
GOALS = {"cold_total_s": 8 * 60, "warm_total_s": 3 * 60, "ova_bytes": 200 * 1000 * 1000}


def time_deps() -> float:
    t0 = time.monotonic()
    subprocess.run(["make", "-s", "deps"], cwd=ROOT, check=True)
    return time.monotonic() - t0


def stages(times: dict[str, float]) -> dict[str, float]:
    """The benchmark's stages from the build's own stage timings."""
    get = times.get
    return {
        "base": get("base", 0.0),
        # Packer with the shared roles (base, agent, firstboot, harden) when the
        # provisioned layer is not cached (its boot / Ansible / shutdown split is
        # in raw_timings_s as layer.*); a cache hit costs ~0 s.
        "layer": get("layer", 0.0),
        "packer_boot": get("packer.packer_boot", 0.0),
        "ansible": get("packer.ansible", 0.0),
        "sysprep": get("packer.sysprep", 0.0) + get("packer.shutdown", 0.0) + get("seal", 0.0),
        # The raw disk's SHA256 runs alongside the OVA since the layer change.
        "ova": get("ova", 0.0),
        "manifest": get("manifest", 0.0),
        "verification": get("verify", 0.0),
        "other": sum(v for k, v in times.items() if k in (
            "preflight", "accel", "credential", "wheelhouse", "disk")),
    }


def _sizes(folder: Path, name: str) -> dict:
    ova, raw = folder / f"{name}.ova", folder / f"{name}.raw"
    out = {}
    if ova.is_file():
        out["ova_bytes"] = ova.stat().st_size
    if raw.is_file():
        out["raw_bytes"] = raw.stat().st_size
        out["raw_allocated_bytes"] = raw.stat().st_blocks * 512
    return out


def one_build(images_dir: Path, label: str) -> dict:
    """One build; a failed build still reports the stages it got through."""
    name = f"bench-{label}-{int(time.time())}"
    opts = build.Options(images_dir=images_dir, name=name,
                         credential=Path(os.environ["BENCH_CREDENTIAL"]) if os.environ.get("BENCH_CREDENTIAL") else None)
    print(f"\n--- {label} build into {images_dir} ---", flush=True)
    progress = Progress()
    try:
        res = build.run(opts, progress)
    except build.BuildError as exc:
        print(f"bench: {label} build failed: {exc}", file=sys.stderr)
        return {"name": name, "error": str(exc).splitlines()[0], "total_s": round(progress.total(), 1),
                "stages_s": {k: round(v, 1) for k, v in stages(progress.times).items()},
                "raw_timings_s": {k: round(v, 1) for k, v in progress.times.items()},
                **_sizes(images_dir / ".partial" / name, name)}
    return {
        "name": res.name,
        "total_s": round(res.total, 1),
        "stages_s": {k: round(v, 1) for k, v in stages(res.times).items()},
        "raw_timings_s": {k: round(v, 1) for k, v in res.times.items()},
        "base_cached": res.base_cached,
        "layer_cached": res.layer_cached,
        "accelerator": res.accelerator,
        **_sizes(res.image_dir, res.name),
    }


def report(result: dict) -> None:
    print("\nbuild benchmark")
    print(f"  deps            {fmt_seconds(result['deps_s'])}")
    for label in ("cold", "warm"):
        run = result.get(label)
        if not run:
            continue
        status = (f"FAILED: {run['error']}" if "error" in run else
                  f"accelerator {run['accelerator']}, layer {'cached' if run.get('layer_cached') else 'built'}")
        print(f"  {label:<5} total     {fmt_seconds(run['total_s'])}  ({status})")
        for stage, secs in run["stages_s"].items():
            print(f"    {stage:<18}{fmt_seconds(secs)}")
        if "ova_bytes" in run:
            print(f"    OVA           {fmt_bytes(run['ova_bytes'])}  ({run['ova_bytes'] / 1e6:.0f} MB)")
        if "raw_bytes" in run:
            print(f"    raw           {fmt_bytes(run['raw_bytes'])} apparent, "
                  f"{fmt_bytes(run['raw_allocated_bytes'])} allocated")
    print(f"  goals: cold <= {GOALS['cold_total_s'] // 60} min, warm <= {GOALS['warm_total_s'] // 60} min, "
          f"OVA <= {GOALS['ova_bytes'] // 10**6} MB")


def main() -> int:
    if os.geteuid() != 0:
        print("bench/build.py: the image build needs root; skipped", file=sys.stderr)
        return 0
    scratch = ROOT / "images" / ".bench"
    images_dir = Path(os.environ.get("BENCH_IMAGES_DIR", scratch))
    runs = os.environ.get("BENCH_BUILD_RUNS", "cold,warm").split(",")
    result: dict = {"machine": {"cpus": os.cpu_count(), "load_1m_before": round(os.getloadavg()[0], 2)},
                    "goals": GOALS,
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result["deps_s"] = round(time_deps(), 1)
    try:
        if "cold" in runs:
            if images_dir != scratch:
                sys.exit("bench/build.py: a cold run starts from an empty images dir; "
                         "it only empties its own scratch dir (unset BENCH_IMAGES_DIR)")
            shutil.rmtree(images_dir, ignore_errors=True)
            result["cold"] = one_build(images_dir, "cold")
        if "warm" in runs:
            result["warm"] = one_build(images_dir, "warm")
    finally:
        if images_dir == scratch and os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(images_dir, ignore_errors=True)  # only the scratch dir bench made
    report(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(f"\nwritten {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
