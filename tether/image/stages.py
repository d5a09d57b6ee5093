"""The stages of `make image`, each a function of its declared inputs.

The shape of osbuild's stages: a stage takes exactly what it reads as
parameters and returns what it made (a path or a small frozen record); it
never sees the build as a whole, so what a stage depends on is its
signature, and tether.image.build wires the outputs of one stage into the
inputs of the next in one visible sequence. The stages that are slow and
repeatable (base disk, accelerator probe, dependency wheels, provisioned
layer) keep their outputs in tether.image.cache under a key of their inputs.

Each stage announces itself and is timed through `progress` (a
tether.image.progress.Progress); failures are BuildError with what to do.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import accel, basedisk, builddisk, buildvars, credential, layer, packerrun, seal, wheelhouse
from .diskio import attached, mounted, sha256_sparse
from .errors import BuildError
from .layout import Layout
from .progress import Progress, fmt_bytes


def base_disk(cache: Path, inputs: basedisk.BaseInputs, progress: Progress) -> basedisk.BaseDisk:
    with progress.stage("base", "base disk: Debian 12 on the A/B layout (cached by its inputs)"):
        return basedisk.ensure(cache, inputs, say=progress.say)


def accelerator(cache: Path, kernel: Path, progress: Progress) -> str:
    with progress.stage("accel", "choosing the qemu accelerator (boots a kernel with KVM)"):
        decision, cached = accel.choose(kernel, cache)
        progress.say(f"accelerator {decision.accelerator}: {decision.reason}{' (cached probe)' if cached else ''}")
        return decision.accelerator


@dataclass(frozen=True)
class Credential:
    """The image credential: its file in the build's scratch and its contents."""

    file: Path
    bundle: dict


def image_credential(given: Path | None, home_state: Path, home_urls: list[str], work: Path,
                     progress: Progress) -> Credential:
    """The credential bundle given (--credential), else a new one issued by the home in `home_state`."""
    with progress.stage("credential", "image credential: a new key pair and certificate from home"):
        if given:
            credential.load(given)
            path = credential.place(given, work)
        else:
            credential.ensure_home(home_state, say=progress.say)
            path = work / "credential.json"
            credential.issue(home_state, path, home_urls)
        bundle = credential.load(path)
        progress.say(f"image id {bundle['image_id']}, key fingerprint {bundle['fingerprint']}")
        return Credential(path, bundle)


def wheels(checkout: Path, work: Path, cache: Path, progress: Progress) -> Path:
    """The wheelhouse: the tether-agent wheel of `checkout` and its dependency wheels."""
    with progress.stage("wheelhouse", "tether-agent wheel of this checkout and its runtime deps for the guest"):
        dest = work / "wheelhouse"
        made = wheelhouse.build(checkout, dest, cache=cache, say=progress.say)
        progress.say(", ".join(w.name for w in made))
        return dest


def build_vars(wheelhouse_dir: Path, cred: Credential, name: str, image_version: str, work: Path) -> Path:
    """Ansible's variables (tether.image.buildvars), written to a file for Packer."""
    variables = buildvars.make(wheelhouse_dir, cred.file, name, cred.bundle["image_id"], image_version)
    return buildvars.write(work / "buildvars.json", variables)


class Packer:
    """Runs Packer over a disk for one build: what every run of it shares."""

    def __init__(self, work: Path, accel_name: str, vars_file: Path, plugin_cache: Path, progress: Progress):
        self.work = work
        self.accelerator = accel_name
        self.vars_file = vars_file
        self.plugin_cache = plugin_cache
        self.progress = progress

    def _variables(self, disk: Path, key: builddisk.BuildKey, output_dir: Path, vm_name: str, label: str,
                   tags: str) -> dict[str, str]:
        playbook = Path(sys.executable).parent / "ansible-playbook"
        return {
            "base_disk": str(disk),
            "output_dir": str(output_dir),
            "vm_name": vm_name,
            "accelerator": self.accelerator,
            "ssh_private_key_file": str(key.private),
            "serial_log": str(self.work / f"serial{'' if label == 'packer' else '-' + label}.log"),
            "buildvars_file": str(self.vars_file),
            "ansible_playbook": str(playbook if playbook.exists() else "ansible-playbook"),
            "ansible_tags": tags,
        }

    def run(self, label: str, disk: Path, key: builddisk.BuildKey, output_dir: Path, vm_name: str,
            tags: str, markers) -> Path:
        """One Packer run; its stages are recorded as `<label>.<stage>`; returns the disk it made."""
        logname = "packer.log" if label == "packer" else f"packer-{label}.log"
        t0 = time.monotonic()
        with (self.work / logname).open("w") as log:
            def say(line: str) -> None:
                minutes, seconds = divmod(int(time.monotonic() - t0), 60)
                log.write(f"[+{minutes:02d}:{seconds:02d}] {line}\n")  # per-task cost, after the fact
                log.flush()
                self.progress.say(line)

            result = packerrun.build(self._variables(disk, key, output_dir, vm_name, label, tags), say=say,
                                     cache_dir=self.plugin_cache, markers=markers)
        for stage, seconds in result.timeline.durations().items():
            self.progress.record(f"{label}.{stage}", seconds)
        if result.returncode != 0:
            shown = "\n    ".join((result.errors or result.tail)[-20:])
            advice = packerrun.hint(result.errors + result.tail)
            shown += f"\n    => {advice}" if advice else ""
            raise BuildError(f"packer build ({label}) failed (exit {result.returncode}):\n    {shown}\n"
                             f"    full log: {self.work / logname}, guest console: {self.work}/serial*.log")
        out = output_dir / vm_name
        if not out.is_file():
            raise BuildError(f"packer finished but {out} is missing")
        return out


@dataclass(frozen=True)
class Layer:
    """The provisioned layer's disk in the cache, and whether an earlier build made it."""

    disk: Path
    cached: bool


def provisioned_layer(base: basedisk.BaseDisk, wheelhouse_dir: Path, lay: Layout, packer: Packer, cache: Path,
                      work: Path, progress: Progress) -> Layer:
    """The base disk with the shared roles applied, cached by tether.image.layer.key."""
    roles = layer.layer_roles()
    with progress.stage("layer", f"provisioned layer: roles {', '.join(roles)} over the base disk (cached)"):
        key = layer.key(base.key, wheelhouse_dir)
        cached = layer.entry(cache, key)
        if cached.ready():
            progress.say(f"layer {cached.path().name} cached (key {key[:16]})")
            return Layer(cached.path(), True)
        progress.say(f"no layer for key {key[:16]}: Packer applies {', '.join(roles)}")
        scratch = work / "layer"
        scratch.mkdir(mode=0o700)
        disk, build_key = builddisk.prepare(base.path, scratch, lay)
        out = packer.run("layer", disk, build_key, scratch / "packer-out", "layer.img", ",".join(roles),
                         packerrun.LAYER_MARKERS)
        with cached.publishing() as publish:
            os.replace(out, publish[".raw"])  # same file system: images/.work and images/.cache
        shutil.rmtree(scratch, ignore_errors=True)
        progress.say(f"layer {cached.path().name}: {fmt_bytes(cached.path().stat().st_blocks * 512)} allocated")
        return Layer(cached.path(), False)


def image_disk(provisioned: Layer, lay: Layout, packer: Packer, name: str, work: Path, partial_dir: Path,
               progress: Progress) -> Path:
    """A copy of the layer with a build-only key, the per-image roles applied: <name>.raw."""
    with progress.stage("disk", "per-build copy of the provisioned layer with a build-only SSH key"):
        # The layer has the agent and first-boot units enabled: hold them for this boot.
        disk, key = builddisk.prepare(provisioned.disk, work, lay, hold_units=builddisk.HOLD_UNITS)
    tags = ",".join(layer.PER_IMAGE_ROLES)
    with progress.stage("packer", f"Packer: boot ({packer.accelerator}), roles {tags}, poweroff"):
        out = packer.run("packer", disk, key, work / "packer-out", f"{name}.img", tags, packerrun.MARKERS)
        raw = partial_dir / f"{name}.raw"
        os.replace(out, raw)
        progress.say(f"raw disk {raw.name}: {fmt_bytes(raw.stat().st_size)} apparent, "
                     f"{fmt_bytes(raw.stat().st_blocks * 512)} allocated")
        return raw


def sealed(raw: Path, lay: Layout, progress: Progress) -> None:
    with progress.stage("seal", "offline clean-up of what the poweroff wrote (random seed, journal), trim"):
        removed = seal.seal(raw, lay)
        progress.say(f"removed {len(removed)} file(s): {', '.join(removed[:6])}{' ...' if len(removed) > 6 else ''}")
        progress.say(f"raw disk now {fmt_bytes(raw.stat().st_blocks * 512)} allocated")


@dataclass(frozen=True)
class Ova:
    """The OVA and the SHA256 of it and of the raw disk (both computed while writing it)."""

    path: Path
    sha256: str
    raw_sha256: str


def ova(raw: Path, name: str, agent_version: str, image_id: str, partial_dir: Path, progress: Progress) -> Ova:
    from . import ova as ova_mod, ovf

    with progress.stage("ova", "OVA: streamOptimized VMDK, OVF descriptor, .mf; the raw disk's SHA256 alongside"):
        product = ovf.Product(name=name, version=agent_version, image_id=image_id)
        # The manifest's SHA256 of the 16 GiB raw disk is computed in a thread
        # while the OVA is written (hashlib releases the GIL; holes are not read).
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sha256-raw") as pool:
            raw_hash = pool.submit(sha256_sparse, raw)
            res = ova_mod.build_ova(raw, partial_dir / f"{name}.ova", product, progress=progress.out)
            return Ova(res.path, res.sha256, raw_hash.result())


def manifest(name: str, bundle: dict, raw: Path, made: Ova, image_version: str, lay: Layout,
             partial_dir: Path, progress: Progress) -> None:
    from . import manifest as manifest_mod

    with progress.stage("manifest", "manifest.json and SHA256SUMS (reads the finished disk read-only)"):
        with mounted_image(raw, lay) as root:
            doc = manifest_mod.build_manifest(name, bundle, root, made.path, raw,
                                              known_sha256={made.path.name: made.sha256, raw.name: made.raw_sha256})
        doc["image_version"] = image_version
        manifest_mod.write_manifest(partial_dir, doc)
        manifest_mod.write_sha256sums(partial_dir, doc)


def update_bundle(name: str, home_state: Path | None, partial_dir: Path, progress: Progress) -> None:
    """<name>.raucb: this build's root filesystem, signed with the update key of the home in `home_state`."""
    from . import bundle

    with progress.stage("bundle", "update bundle: the root filesystem, signed with home's update key"):
        if home_state is None:
            progress.say("no home state (the credential came from --credential): no bundle; run "
                         f"`make bundle NAME={name} HOME_STATE=<that home's state>`")
            return
        from tether.home import paths, updatekeys

        keys = updatekeys.ensure(paths.StatePaths(home_state))
        info = bundle.from_image(partial_dir, name, None, keys.signing_cert, keys.signing_key, say=progress.say)
        progress.say(f"{name}.raucb: version {info.version}, {fmt_bytes(info.size)}, sha256 {info.sha256[:16]}")


def verified(partial_dir: Path, work: Path, progress: Progress) -> None:
    from . import verify

    with progress.stage("verify", "image checks (pytest-testinfra on the disk, read-only)"):
        verify.check(partial_dir, work / "verify.xml", say=progress.say)


@contextlib.contextmanager
def mounted_image(raw: Path, lay: Layout):
    """root-a of a finished disk, read-only, without replaying its journal."""
    with contextlib.ExitStack() as stack:
        loop = stack.enter_context(attached(raw, len(lay.partitions), read_only=True))
        mnt = raw.parent.parent / f".mnt-{raw.stem}"
        # Registered before the mount, so it runs after the unmount.
        stack.callback(lambda: mnt.rmdir() if mnt.is_dir() and not any(mnt.iterdir()) else None)
        root = stack.enter_context(mounted(loop.partition(lay.by_label("root-a").number), mnt,
                                           options="ro,noload,nodev,nosuid"))
        yield root
