"""`make image`: the whole pipeline, one small step per stage.

    preflight → lock → base disk (cached) → accelerator (cached) → image
    credential → wheelhouse (tether-agent wheel; dependency wheels cached) →
    build vars → provisioned layer (cached: Packer with the shared roles over
    the base disk) → build disk + key → Packer (boot, per-image roles
    identity + update + sysprep, shutdown) → seal → OVA (the raw disk's
    SHA256 computed alongside) → manifest + SHA256SUMS → update bundle →
    verification

Each stage is a function of tether.image.stages with its inputs as
parameters and its outputs as return value; `_pipeline` below is the one
place that wires them, so the data flow of a build reads top to bottom.
The cached stages share tether.image.cache (key of the declared inputs →
entry in images/.cache/, published atomically).

Everything is assembled in images/.partial/<name>/ and renamed to
images/<name>/ only after the checks passed, so a folder under images/ that
has a name is always a finished, verified image. Scratch (the build disk,
the build-only key, the credential copy, the wheelhouse) lives in
images/.work/<name>/ and is deleted at the end, also on failure; the logs
of a failed build (serial console, Packer output) are kept next to it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tether import imageversion

from . import basedisk, preflight, stages
from .errors import BuildError
from .lock import BuildLock
from .progress import Progress, fmt_bytes, fmt_seconds

CHECKOUT = Path(__file__).resolve().parents[2]
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEFAULT_HOME_URL = "wss://home.tether.invalid:443/"


@dataclass
class Options:
    images_dir: Path = CHECKOUT / "images"
    name: str | None = None
    home_state: Path | None = None
    credential: Path | None = None
    home_urls: list[str] = field(default_factory=list)
    verify: bool = True


@dataclass
class Result:
    name: str
    image_dir: Path
    artifacts: dict[str, Path]
    fingerprint: str
    image_id: str
    base_cached: bool
    accelerator: str
    layer_cached: bool
    times: dict[str, float]
    total: float


@dataclass(frozen=True)
class BuildDirs:
    """Where one build writes: its final folder, the partial one, scratch, the shared cache."""

    final: Path
    partial: Path
    work: Path
    cache: Path


def default_name() -> str:
    return f"tether-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise BuildError(f"image name {name!r}: use 1-63 characters of a-z 0-9 . _ - starting with a letter or digit")
    return name


def run(opts: Options, progress: Progress | None = None) -> Result:
    """Build one image; raise BuildError with an actionable message on failure."""
    progress = progress or Progress()
    images = opts.images_dir.resolve()
    name = check_name(opts.name or default_name())
    with progress.stage("preflight", "checking root, free disk, images/ and tools"):
        preflight.run_all(images)
        if (images / name).exists():
            raise BuildError(f"{images / name} exists already: pick another NAME= or delete that folder")
    lock = BuildLock(images, name=name)
    with lock:
        if lock.stale_message():
            progress.say(lock.stale_message())
        dirs = BuildDirs(images / name, images / ".partial" / name, images / ".work" / name, images / ".cache")
        for leftover in (dirs.partial, dirs.work):
            shutil.rmtree(leftover, ignore_errors=True)
        dirs.partial.mkdir(parents=True)
        dirs.work.mkdir(parents=True, mode=0o700)
        ok = False
        try:
            result = _pipeline(opts, name, dirs, progress)
            os.replace(dirs.partial, dirs.final)
            ok = True
        finally:
            _cleanup(dirs, ok, progress)
        return result


def _pipeline(opts: Options, name: str, dirs: BuildDirs, progress: Progress) -> Result:
    """The stages in order, each handed the outputs it declares as inputs (tether.image.stages)."""
    images = opts.images_dir.resolve()
    inputs = basedisk.default_inputs()
    lay = inputs.layout
    version = _agent_version()
    home_state = (opts.home_state or images / ".home").resolve()

    base = stages.base_disk(dirs.cache, inputs, progress)
    accelerator = stages.accelerator(dirs.cache, base.kernel, progress)
    cred = stages.image_credential(opts.credential, home_state, opts.home_urls, dirs.work, progress)
    wheels = stages.wheels(CHECKOUT, dirs.work, dirs.cache, progress)
    # Known before Packer runs: the role update writes it into the slot, the
    # manifest and the bundle carry the same string.
    image_version = imageversion.make(version, datetime.now(timezone.utc))
    vars_file = stages.build_vars(wheels, cred, name, image_version, dirs.work)
    packer = stages.Packer(dirs.work, accelerator, vars_file, dirs.cache / "packer", progress)
    provisioned = stages.provisioned_layer(base, wheels, lay, packer, dirs.cache, dirs.work, progress)
    raw = stages.image_disk(provisioned, lay, packer, name, dirs.work, dirs.partial, progress)
    stages.sealed(raw, lay, progress)
    made = stages.ova(raw, name, version, cred.bundle["image_id"], dirs.partial, progress)
    stages.manifest(name, cred.bundle, raw, made, image_version, lay, dirs.partial, progress)
    # A credential given without its home: no update key to sign a bundle with.
    signing_home = None if opts.credential and not opts.home_state else home_state
    stages.update_bundle(name, signing_home, dirs.partial, progress)
    if opts.verify:
        stages.verified(dirs.partial, dirs.work, progress)
    artifacts = {kind: dirs.final / f"{name}.{kind}" for kind in ("ova", "raw", "raucb")}
    artifacts["manifest"] = dirs.final / "manifest.json"
    artifacts["sums"] = dirs.final / "SHA256SUMS"
    return Result(name, dirs.final, artifacts, cred.bundle["fingerprint"], cred.bundle["image_id"],
                  base.cached, accelerator, provisioned.cached, dict(progress.times), progress.total())


def _agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tether")
    except PackageNotFoundError:
        return "0+unknown"


def _cleanup(dirs: BuildDirs, ok: bool, progress: Progress) -> None:
    """Remove scratch; after a failure keep only the logs to look at."""
    keep = ("packer.log", "serial.log", "packer-layer.log", "serial-layer.log", "verify.xml")
    if ok:
        shutil.rmtree(dirs.work, ignore_errors=True)
        with contextlib.suppress(OSError):
            dirs.partial.parent.rmdir()
        return
    if dirs.work.is_dir():
        for entry in dirs.work.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        progress.say(f"build failed; logs kept in {dirs.work}")
    if dirs.partial.is_dir():
        if any(dirs.partial.iterdir()):
            progress.say(f"unfinished artifacts left in {dirs.partial} (not an image: delete it)")
        else:
            dirs.partial.rmdir()


def summary(res: Result) -> str:
    lines = [f"image {res.name} built and verified in {fmt_seconds(res.total)}", f"  folder      {res.image_dir}"]
    for kind, path in res.artifacts.items():
        if path.is_file():
            st = path.stat()
            extra = f", {fmt_bytes(st.st_blocks * 512)} allocated" if kind == "raw" else ""
            lines.append(f"  {kind:<11} {path.name}  {fmt_bytes(st.st_size)}{extra}")
    lines += [f"  image id    {res.image_id}", f"  fingerprint {res.fingerprint} (sha256 of the image key's SPKI)",
              (f"  base disk   {'cached' if res.base_cached else 'built'}; provisioned layer "
               f"{'cached' if res.layer_cached else 'built'}; accelerator {res.accelerator}"),
              "  stages      " + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in res.times.items())]
    return "\n".join(lines)
