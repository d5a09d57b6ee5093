"""`make image`: the whole pipeline, one small step per stage.

    preflight → lock → base disk (cached) → accelerator → image credential →
    wheelhouse → build vars → provisioned layer (cached: Packer with the
    shared roles over the base disk) → build disk + key → Packer (boot,
    per-image roles identity + sysprep, shutdown) → seal → OVA (the raw
    disk's SHA256 computed alongside) → manifest + SHA256SUMS → verification

Everything is assembled in images/.partial/<name>/ and renamed to
images/<name>/ only after the checks passed, so a folder under images/ that
has a name is always a finished, verified image. Scratch (the build disk,
the build-only key, the credential copy, the wheelhouse) lives in
images/.work/<name>/ and is deleted at the end, also on failure; the logs
of a failed build (serial console, Packer output) are kept next to it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import accel, basedisk, builddisk, buildvars, credential, layer, packerrun, preflight, seal, wheelhouse
from .diskio import attached, mounted, sha256_sparse
from .errors import BuildError
from .lock import BuildLock
from .progress import Progress, fmt_bytes, fmt_seconds
from . import verify as verify_mod

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


def default_name() -> str:
    return f"tether-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise BuildError(f"image name {name!r}: use 1-63 characters of a-z 0-9 . _ - starting with a letter or digit")
    return name


@dataclass
class _Ctx:
    opts: Options
    name: str
    progress: Progress
    final_dir: Path
    partial_dir: Path
    work: Path
    base: basedisk.BaseDisk | None = None
    accelerator: str = "tcg"
    bundle: dict | None = None
    credential_file: Path | None = None
    wheels: Path | None = None
    layer: Path | None = None
    layer_cached: bool = False
    raw_sha256: str | None = None
    disk: Path | None = None
    key: builddisk.BuildKey | None = None
    vars_file: Path | None = None
    raw: Path | None = None
    ova: Path | None = None
    ova_sha256: str | None = None
    image_version: str | None = None


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
        ctx = _Ctx(opts, name, progress, images / name, images / ".partial" / name, images / ".work" / name)
        return _pipeline(ctx)


def _pipeline(ctx: _Ctx) -> Result:
    for leftover in (ctx.partial_dir, ctx.work):
        shutil.rmtree(leftover, ignore_errors=True)
    ctx.partial_dir.mkdir(parents=True)
    ctx.work.mkdir(parents=True, mode=0o700)
    ok = False
    try:
        for step in (_base, _accel, _credential, _wheelhouse, _vars, _layer, _build_disk, _packer, _seal, _ova,
                     _manifest, _bundle):
            step(ctx)
        if ctx.opts.verify:
            _verify(ctx)
        os.replace(ctx.partial_dir, ctx.final_dir)
        ok = True
    finally:
        _cleanup(ctx, ok)
    return _result(ctx)


def _base(ctx: _Ctx) -> None:
    with ctx.progress.stage("base", "base disk: Debian 12 on the A/B layout (cached by its inputs)"):
        cache = ctx.opts.images_dir.resolve() / ".cache"
        ctx.base = basedisk.ensure(cache, basedisk.default_inputs(), say=ctx.progress.say)


def _accel(ctx: _Ctx) -> None:
    with ctx.progress.stage("accel", "choosing the qemu accelerator (boots a kernel with KVM)"):
        cache = ctx.opts.images_dir.resolve() / ".cache" / "accel.json"
        decision, cached = accel.choose(ctx.base.kernel, cache)
        ctx.accelerator = decision.accelerator
        ctx.progress.say(f"accelerator {decision.accelerator}: {decision.reason}{' (cached probe)' if cached else ''}")


def _credential(ctx: _Ctx) -> None:
    with ctx.progress.stage("credential", "image credential: a new key pair and certificate from home"):
        if ctx.opts.credential:
            credential.load(ctx.opts.credential)
            path = credential.place(ctx.opts.credential, ctx.work)
        else:
            state = (ctx.opts.home_state or ctx.opts.images_dir / ".home").resolve()
            credential.ensure_home(state, say=ctx.progress.say)
            path = ctx.work / "credential.json"
            credential.issue(state, path, ctx.opts.home_urls)
        ctx.credential_file = path
        ctx.bundle = credential.load(path)
        ctx.progress.say(f"image id {ctx.bundle['image_id']}, key fingerprint {ctx.bundle['fingerprint']}")


def _wheelhouse(ctx: _Ctx) -> None:
    with ctx.progress.stage("wheelhouse", "wheels of this checkout and its runtime deps for the guest"):
        wheels = wheelhouse.build(CHECKOUT, ctx.work / "wheelhouse",
                                  cache=ctx.opts.images_dir.resolve() / ".cache", say=ctx.progress.say)
        ctx.wheels = ctx.work / "wheelhouse"
        ctx.progress.say(", ".join(w.name for w in wheels))


def _vars(ctx: _Ctx) -> None:
    from datetime import datetime, timezone

    from tether import imageversion

    # Known before Packer runs: the role update writes it into the slot, the
    # manifest and the bundle carry the same string.
    ctx.image_version = imageversion.make(_agent_version(), datetime.now(timezone.utc))
    variables = buildvars.make(ctx.wheels, ctx.credential_file, ctx.name, ctx.bundle["image_id"],
                               ctx.image_version)
    ctx.vars_file = buildvars.write(ctx.work / "buildvars.json", variables)


def _cache(ctx: _Ctx) -> Path:
    return ctx.opts.images_dir.resolve() / ".cache"


def _layer(ctx: _Ctx) -> None:
    """The base disk with the shared roles applied, cached by tether.image.layer.key."""
    roles = layer.layer_roles()
    with ctx.progress.stage("layer", f"provisioned layer: roles {', '.join(roles)} over the base disk (cached)"):
        key = layer.key(ctx.base.key, ctx.wheels)
        cached = layer.path_for(_cache(ctx), key)
        if cached.is_file():
            ctx.layer, ctx.layer_cached = cached, True
            ctx.progress.say(f"layer {cached.name} cached (key {key[:16]})")
            return
        ctx.progress.say(f"no layer for key {key[:16]}: Packer applies {', '.join(roles)}")
        work = ctx.work / "layer"
        work.mkdir(mode=0o700)
        disk, build_key = builddisk.prepare(ctx.base.path, work, basedisk.default_inputs().layout)
        out = _run_packer(ctx, "layer", disk, build_key, work / "packer-out", "layer.img",
                          ",".join(roles), packerrun.LAYER_MARKERS)
        ctx.layer = layer.store(out, _cache(ctx), key)
        shutil.rmtree(work, ignore_errors=True)
        ctx.progress.say(f"layer {ctx.layer.name}: {fmt_bytes(ctx.layer.stat().st_blocks * 512)} allocated")


def _build_disk(ctx: _Ctx) -> None:
    with ctx.progress.stage("disk", "per-build copy of the provisioned layer with a build-only SSH key"):
        lay = basedisk.default_inputs().layout
        # The layer has the agent and first-boot units enabled: hold them for this boot.
        ctx.disk, ctx.key = builddisk.prepare(ctx.layer, ctx.work, lay, hold_units=builddisk.HOLD_UNITS)


def _packer_vars(ctx: _Ctx, disk: Path, key: builddisk.BuildKey, output_dir: Path, vm_name: str,
                 tags: str) -> dict[str, str]:
    venv_bin = Path(sys.executable).parent
    playbook = venv_bin / "ansible-playbook"
    return {
        "base_disk": str(disk),
        "output_dir": str(output_dir),
        "vm_name": vm_name,
        "accelerator": ctx.accelerator,
        "ssh_private_key_file": str(key.private),
        "serial_log": str(ctx.work / f"serial{'-layer' if vm_name == 'layer.img' else ''}.log"),
        "buildvars_file": str(ctx.vars_file),
        "ansible_playbook": str(playbook if playbook.exists() else "ansible-playbook"),
        "ansible_tags": tags,
    }


def _run_packer(ctx: _Ctx, label: str, disk: Path, key: builddisk.BuildKey, output_dir: Path, vm_name: str,
                tags: str, markers) -> Path:
    """One Packer run; its stages are recorded as `<label>.<stage>`; returns the disk it made."""
    logname = "packer.log" if label == "packer" else f"packer-{label}.log"
    log = (ctx.work / logname).open("w")
    t0 = time.monotonic()

    def say(line: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - t0), 60)
        log.write(f"[+{minutes:02d}:{seconds:02d}] {line}\n")  # per-task cost, after the fact
        log.flush()
        ctx.progress.say(line)

    try:
        result = packerrun.build(_packer_vars(ctx, disk, key, output_dir, vm_name, tags), say=say,
                                 cache_dir=_cache(ctx) / "packer", markers=markers)
    finally:
        log.close()
    for stage, seconds in result.timeline.durations().items():
        ctx.progress.record(f"{label}.{stage}", seconds)
    if result.returncode != 0:
        shown = "\n    ".join((result.errors or result.tail)[-20:])
        advice = packerrun.hint(result.errors + result.tail)
        shown += f"\n    => {advice}" if advice else ""
        raise BuildError(f"packer build ({label}) failed (exit {result.returncode}):\n    {shown}\n"
                         f"    full log: {ctx.work / logname}, guest console: {ctx.work}/serial*.log")
    out = output_dir / vm_name
    if not out.is_file():
        raise BuildError(f"packer finished but {out} is missing")
    return out


def _packer(ctx: _Ctx) -> None:
    tags = ",".join(layer.PER_IMAGE_ROLES)
    with ctx.progress.stage("packer", f"Packer: boot ({ctx.accelerator}), roles {tags}, poweroff"):
        out = _run_packer(ctx, "packer", ctx.disk, ctx.key, ctx.work / "packer-out", f"{ctx.name}.img",
                          tags, packerrun.MARKERS)
        ctx.raw = ctx.partial_dir / f"{ctx.name}.raw"
        os.replace(out, ctx.raw)
        ctx.progress.say(f"raw disk {ctx.raw.name}: {fmt_bytes(ctx.raw.stat().st_size)} apparent, "
                         f"{fmt_bytes(ctx.raw.stat().st_blocks * 512)} allocated")


def _seal(ctx: _Ctx) -> None:
    with ctx.progress.stage("seal", "offline clean-up of what the poweroff wrote (random seed, journal), trim"):
        removed = seal.seal(ctx.raw, basedisk.default_inputs().layout)
        ctx.progress.say(f"removed {len(removed)} file(s): {', '.join(removed[:6])}{' ...' if len(removed) > 6 else ''}")
        ctx.progress.say(f"raw disk now {fmt_bytes(ctx.raw.stat().st_blocks * 512)} allocated")


def _ova(ctx: _Ctx) -> None:
    from . import ova, ovf

    with ctx.progress.stage("ova", "OVA: streamOptimized VMDK, OVF descriptor, .mf; the raw disk's SHA256 alongside"):
        version = _agent_version()
        product = ovf.Product(name=ctx.name, version=version, image_id=ctx.bundle["image_id"])
        # The manifest's SHA256 of the 16 GiB raw disk is computed in a thread
        # while the OVA is written (hashlib releases the GIL; holes are not read).
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sha256-raw") as pool:
            raw_hash = pool.submit(sha256_sparse, ctx.raw)
            res = ova.build_ova(ctx.raw, ctx.partial_dir / f"{ctx.name}.ova", product, progress=ctx.progress.out)
            ctx.raw_sha256 = raw_hash.result()
        ctx.ova, ctx.ova_sha256 = res.path, res.sha256


def _agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tether")
    except PackageNotFoundError:
        return "0+unknown"


def _manifest(ctx: _Ctx) -> None:
    from . import manifest

    with ctx.progress.stage("manifest", "manifest.json and SHA256SUMS (reads the finished disk read-only)"):
        with mounted_image(ctx.raw) as root:
            doc = manifest.build_manifest(ctx.name, ctx.bundle, root, ctx.ova, ctx.raw,
                                          known_sha256={ctx.ova.name: ctx.ova_sha256,
                                                        ctx.raw.name: ctx.raw_sha256})
        doc["image_version"] = ctx.image_version
        manifest.write_manifest(ctx.partial_dir, doc)
        manifest.write_sha256sums(ctx.partial_dir, doc)


def _bundle(ctx: _Ctx) -> None:
    """<name>.raucb: this build's root filesystem, signed with the home's update key."""
    from . import bundle

    with ctx.progress.stage("bundle", "update bundle: the root filesystem, signed with home's update key"):
        if ctx.opts.credential and not ctx.opts.home_state:
            ctx.progress.say("no home state (the credential came from --credential): no bundle; run "
                             f"`make bundle NAME={ctx.name} HOME_STATE=<that home's state>`")
            return
        from tether.home import paths, updatekeys

        state = (ctx.opts.home_state or ctx.opts.images_dir / ".home").resolve()
        keys = updatekeys.ensure(paths.StatePaths(state))
        info = bundle.from_image(ctx.partial_dir, ctx.name, None, keys.signing_cert, keys.signing_key,
                                 say=ctx.progress.say)
        ctx.progress.say(f"{ctx.name}.raucb: version {info.version}, {fmt_bytes(info.size)}, sha256 {info.sha256[:16]}")


@contextlib.contextmanager
def mounted_image(raw: Path):
    """root-a of a finished disk, read-only, without replaying its journal."""
    lay = basedisk.default_inputs().layout
    with contextlib.ExitStack() as stack:
        loop = stack.enter_context(attached(raw, len(lay.partitions), read_only=True))
        mnt = raw.parent.parent / f".mnt-{raw.stem}"
        # Registered before the mount, so it runs after the unmount.
        stack.callback(lambda: mnt.rmdir() if mnt.is_dir() and not any(mnt.iterdir()) else None)
        root = stack.enter_context(mounted(loop.partition(lay.by_label("root-a").number), mnt,
                                           options="ro,noload,nodev,nosuid"))
        yield root


def _verify(ctx: _Ctx) -> None:
    with ctx.progress.stage("verify", "image checks (pytest-testinfra on the disk, read-only)"):
        verify_mod.check(ctx.partial_dir, ctx.work / "verify.xml", say=ctx.progress.say)


def _cleanup(ctx: _Ctx, ok: bool) -> None:
    """Remove scratch; after a failure keep only the logs to look at."""
    keep = ("packer.log", "serial.log", "packer-layer.log", "serial-layer.log", "verify.xml")
    if ok:
        shutil.rmtree(ctx.work, ignore_errors=True)
        with contextlib.suppress(OSError):
            ctx.partial_dir.parent.rmdir()
        return
    if ctx.work.is_dir():
        for entry in ctx.work.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        ctx.progress.say(f"build failed; logs kept in {ctx.work}")
    if ctx.partial_dir.is_dir():
        if any(ctx.partial_dir.iterdir()):
            ctx.progress.say(f"unfinished artifacts left in {ctx.partial_dir} (not an image: delete it)")
        else:
            ctx.partial_dir.rmdir()


def _result(ctx: _Ctx) -> Result:
    final = ctx.final_dir
    artifacts = {kind: final / f"{ctx.name}.{kind}" for kind in ("ova", "raw", "raucb")}
    artifacts["manifest"] = final / "manifest.json"
    artifacts["sums"] = final / "SHA256SUMS"
    return Result(ctx.name, final, artifacts, ctx.bundle["fingerprint"], ctx.bundle["image_id"],
                  ctx.base.cached, ctx.accelerator, ctx.layer_cached, dict(ctx.progress.times),
                  ctx.progress.total())


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
