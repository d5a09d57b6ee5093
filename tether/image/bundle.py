"""Whole-image update bundles: the root filesystem of a build, signed for RAUC.

A bundle (`<name>.raucb`, RAUC `plain` format: a squashfs holding the
manifest and `rootfs.tar`, with a CMS signature over all of it) carries one
build's root filesystem for the idle slot. It is signed with the operator
home's update key (tether.home.updatekeys); an appliance trusts only that
home's update CA (its RAUC keyring), so one bundle updates every appliance
of the home, whatever image it was first deployed from. Therefore it holds
nothing per-image: `/etc/tether` (the image's key, certificate and settings)
is left out, and the installer carries the running slot's copy over.

`compatible` names product and architecture; `version` is the image's
version (RAUC does not compare versions: the agent refuses one not newer).
RAUC checks the signature itself; `verify` runs the same check on the build
host or at home, with the purpose the appliance uses (codesign), so a bundle
home accepts is one the appliance accepts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tether import imageversion

from . import layout
from .diskio import attached, mounted
from .errors import BuildError
from .proc import require, run

COMPATIBLE = "tether-appliance-amd64"
IMAGE_FILE = "rootfs.tar"
#: Per-image files left out of every bundle (paths as tar lists them).
PER_IMAGE_EXCLUDES = ("./etc/tether/*",)
#: The whole root slot is written; the bundle never exceeds what the slot holds.
FORMAT = "plain"


class BundleError(BuildError):
    """A bundle that cannot be made or is not acceptable; the message says what to do."""


@dataclass(frozen=True)
class BundleInfo:
    compatible: str
    version: str
    sha256: str
    size: int


def manifest_text(version: str, compatible: str = COMPATIBLE) -> str:
    if not version or any(c in version for c in "\n\r[]="):
        raise BundleError(f"bundle version {version!r} is not one plain word: give the image's version")
    return (f"[update]\ncompatible={compatible}\nversion={version}\n\n"
            f"[bundle]\nformat={FORMAT}\n\n"
            f"[image.rootfs]\nfilename={IMAGE_FILE}\n")


def rootfs_tar(root: Path, out: Path) -> None:
    """tar of a mounted root slot: owners by number, xattrs (file capabilities), no other mounts."""
    cmd = ["tar", "--create", "--file", str(out), "--directory", str(root), "--numeric-owner",
           "--xattrs", "--xattrs-include=*", "--acls", "--one-file-system", "--sparse"]
    cmd += [f"--exclude={pattern}" for pattern in PER_IMAGE_EXCLUDES]
    run(cmd + ["."], what=f"tar of the root filesystem {root}")


def create(tar: Path, out: Path, version: str, cert: Path, key: Path, compatible: str = COMPATIBLE) -> BundleInfo:
    """Sign `tar` into the bundle `out` (written under a temporary name, then renamed)."""
    require("rauc", "rauc")
    require("mksquashfs", "squashfs-tools")
    for path, what in ((cert, "update signing certificate"), (key, "update signing key")):
        if not path.is_file():
            raise BundleError(f"{what} {path} missing: run `tether-home init` (or any `tether-home update` "
                              "command on an existing home) to create the update key")
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=out.parent) as tmp:
        content = Path(tmp) / "content"
        content.mkdir()
        (content / "manifest.raucm").write_text(manifest_text(version, compatible))
        (content / IMAGE_FILE).hardlink_to(tar) if _same_fs(tar, content) else _copy(tar, content / IMAGE_FILE)
        partial = Path(tmp) / out.name
        run(["rauc", "bundle", "--cert", str(cert), "--key", str(key), str(content), str(partial)],
            what="rauc bundle (signing with the update key)")
        partial.replace(out)
    return BundleInfo(compatible, version, sha256_file(out), out.stat().st_size)


def _same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _copy(src: Path, dest: Path) -> None:
    run(["cp", "--sparse=always", str(src), str(dest)], what=f"copying {src.name}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _system_conf(ca_cert: Path, compatible: str) -> str:
    return (f"[system]\ncompatible={compatible}\nbootloader=noop\n\n"
            f"[keyring]\npath={ca_cert}\ncheck-purpose=codesign\n")


def verify(bundle: Path, ca_cert: Path, compatible: str = COMPATIBLE) -> BundleInfo:
    """Check the signature against the update CA and the compatible string; raise BundleError."""
    require("rauc", "rauc")
    if not bundle.is_file():
        raise BundleError(f"bundle {bundle} not found: give the .raucb file `make image` or `make bundle` wrote")
    with tempfile.TemporaryDirectory(prefix="tether-rauc-") as tmp:
        conf = Path(tmp) / "system.conf"
        conf.write_text(_system_conf(ca_cert, compatible))
        res = subprocess.run(["rauc", "info", "--conf", str(conf), "--output-format=json", str(bundle)],
                             capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        reason = _last_line(res.stderr)
        raise BundleError(f"bundle {bundle.name} refused: {reason}; only bundles signed with this home's "
                          "update key (tether-home update) are accepted")
    try:
        info = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BundleError(f"bundle {bundle.name}: rauc info printed no manifest; is it a RAUC bundle?") from None
    if info.get("compatible") != compatible:
        raise BundleError(f"bundle {bundle.name} is for {info.get('compatible')!r}, not {compatible!r}: "
                          "build it for this product and architecture")
    return BundleInfo(info["compatible"], str(info.get("version") or ""), sha256_file(bundle),
                      bundle.stat().st_size)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "rauc gave no reason"


@contextlib.contextmanager
def _mounted_root(raw: Path):
    """root-a of a finished disk, read-only, without replaying its journal."""
    lay = layout.plan()
    with contextlib.ExitStack() as stack:
        loop = stack.enter_context(attached(raw, len(lay.partitions), read_only=True))
        mnt = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".mnt-bundle-", dir=raw.parent.parent)))
        yield stack.enter_context(mounted(loop.partition(lay.by_label("root-a").number), mnt / "root",
                                          options="ro,noload,nodev,nosuid"))


def image_version(doc: dict) -> str:
    """The image's version: the agent's version and the build time, dot-separated numbers.

    e.g. 0.1.0.20261205092432: two builds of one checkout still order by build
    time, and the agent compares versions as tuples of integers.
    """
    if doc.get("image_version"):  # written by builds that put the version into the slot
        try:
            imageversion.parse(doc["image_version"])
            return doc["image_version"]
        except imageversion.VersionError as exc:
            raise BundleError(f"the image's manifest: {exc}; rebuild the image (make image)") from None
    digits = "".join(c for c in str(doc.get("built_at", ""))[:19] if c.isdigit())
    base = ".".join(part for part in str(doc.get("agent_version", "0")).split(".") if part.isdigit()) or "0"
    if len(digits) != 14:
        raise BundleError("the image's manifest has no built_at time: rebuild the image (make image)")
    version = f"{base}.{digits}"
    imageversion.parse(version)
    return version


def from_image(image_dir: Path, name: str, version: str | None, cert: Path, key: Path, say=print) -> BundleInfo:
    """images/<name>/<name>.raucb from the finished disk's root slot; recorded in the manifest."""
    from . import manifest

    raw = image_dir / f"{name}.raw"
    if not raw.is_file():
        raise BundleError(f"{raw} not found: build the image first (make image NAME={name})")
    out = image_dir / f"{name}.raucb"
    doc = manifest.read_manifest(image_dir)
    version = version or image_version(doc)
    with tempfile.TemporaryDirectory(prefix=".bundle-tar-", dir=image_dir.parent) as tmp:
        tar = Path(tmp) / IMAGE_FILE
        with _mounted_root(raw) as root:
            say(f"bundle: tar of {raw.name}'s root slot (without {', '.join(PER_IMAGE_EXCLUDES)})")
            rootfs_tar(root, tar)
        say("bundle: squashfs + signature (rauc bundle)")
        info = create(tar, out, version, cert, key)
    doc["bundle"] = {"file": out.name, "version": info.version, "compatible": info.compatible,
                     "sha256": info.sha256, "size": info.size}
    doc["artifacts"][out.name] = {"size": info.size, "sha256": info.sha256}
    manifest.write_manifest(image_dir, doc)
    manifest.write_sha256sums(image_dir, doc)
    return info
