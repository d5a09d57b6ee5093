"""The provisioned layer: the base disk after the roles every image shares.

A build runs Packer twice. The first run boots a copy of the base disk and
applies the roles that are the same for every image (base, agent, firstboot,
harden: everything in ansible/site.yml before the per-image roles); its disk
is kept in the cache as `provisioned-<key>.raw`. The second run boots a copy
of that layer with a fresh build key and applies only the per-image roles
(identity: this image's own key pair; sysprep). A warm build finds the layer
and runs only the second Packer run.

The key is the SHA256 of everything that goes into the layer, so a change to
any of it makes a new layer (and the old one is pruned):

* the base disk's own key (its packages, layout, boot configuration);
* every file of the shared roles, of ansible/files (scripts the roles share,
  e.g. write_files.py), site.yml and ansible.cfg;
* the Packer templates (how the guest is booted and provisioned);
* the unit files the roles install from the checkout (agent/*.service);
* the wheelhouse (the tether-agent wheel, tether.image.agentdist, and its
  dependencies: exactly what goes on the appliance): every wheel by its
  members' names and contents, so a rebuilt but identical agent wheel (new
  zip timestamps) keeps the layer, a changed agent makes a new one and an
  edit of home/ or of this tooling (not in the wheel) changes nothing;
* the list of per-image roles and FORMAT (bump it when the way the layer is
  made changes).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import yaml

from .cache import Entry

CHECKOUT = Path(__file__).resolve().parents[2]
FORMAT = 1
#: Roles that differ per image; everything before them in site.yml is the layer.
PER_IMAGE_ROLES = ("identity", "update", "sysprep")
#: Files from the checkout that the shared roles install (besides their own files).
UNIT_FILES = ("agent/tether-agent.service", "agent/tether-firstboot.service")


def site_roles(checkout: Path = CHECKOUT) -> list[str]:
    play = yaml.safe_load((checkout / "ansible" / "site.yml").read_text())[0]
    return [r["role"] if isinstance(r, dict) else r for r in play["roles"]]


def layer_roles(checkout: Path = CHECKOUT) -> list[str]:
    """The shared roles, in playbook order (site.yml runs the per-image roles last)."""
    roles = site_roles(checkout)
    first = min((roles.index(r) for r in PER_IMAGE_ROLES if r in roles), default=len(roles))
    return roles[:first]


def _tree_digest(top: Path, digest: hashlib._Hash, label: str) -> None:
    for path in sorted(p for p in top.rglob("*") if p.is_file()):
        digest.update(f"{label}/{path.relative_to(top).as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())


def _wheel_digest(wheel: Path) -> bytes:
    """Digest of a wheel's members (names and bytes), not of the zip's metadata.

    Two members are left out or cut: RECORD (hashes of the others, so nothing
    new) and the long description of METADATA (the README, which pyproject
    puts there: a README edit changes no behaviour of the appliance). The
    METADATA headers (name, version, requirements) count.
    """
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            name = info.filename
            if name.endswith(".dist-info/RECORD"):
                continue
            data = archive.read(info)
            if name.endswith(".dist-info/METADATA"):
                data = data.split(b"\n\n", 1)[0]
            digest.update(f"{name}\0".encode())
            digest.update(hashlib.sha256(data).digest())
    return digest.digest()


def key(base_key: str, wheelhouse: Path, checkout: Path = CHECKOUT) -> str:
    """The layer's cache key (hex)."""
    digest = hashlib.sha256()
    roles = layer_roles(checkout)
    digest.update(json.dumps({"format": FORMAT, "base": base_key, "roles": roles,
                              "per_image": list(PER_IMAGE_ROLES)}, sort_keys=True).encode())
    for role in roles:
        _tree_digest(checkout / "ansible" / "roles" / role, digest, f"role:{role}")
    _tree_digest(checkout / "ansible" / "files", digest, "ansible-files")
    for name in ("ansible/site.yml", "ansible/ansible.cfg", *UNIT_FILES):
        digest.update(f"file:{name}\0".encode())
        digest.update(hashlib.sha256((checkout / name).read_bytes()).digest())
    for template in sorted((checkout / "packer").glob("*.pkr.hcl")):
        digest.update(f"packer:{template.name}\0".encode())
        digest.update(hashlib.sha256(template.read_bytes()).digest())
    for wheel in sorted(wheelhouse.glob("*.whl")):
        digest.update(f"wheel:{wheel.name}\0".encode())
        digest.update(_wheel_digest(wheel))
    return digest.hexdigest()


def entry(cache_dir: Path, layer_key: str) -> Entry:
    """The cache entry of a layer: provisioned-<key>.raw (a GiB or more; other keys are pruned)."""
    return Entry(cache_dir, "provisioned", layer_key, (".raw",))
