"""manifest.json and SHA256SUMS for one built image.

The manifest is what an operator (and home) uses to tell images apart and to
audit them: which image id and key it carries, what software is inside, and
the digests of the artifacts. Every input is explicit (paths, the mounted
root, the credential bundle from CONTRACTS.md) so the build calls these
functions at the end and the tests call them on small fixtures.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tether.atomicfile import write_atomic
from tether.image.errors import BuildError
from tether.image.ova import allocated_bytes, sha256_file

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
FORMAT = "tether-image-manifest"


def key_fingerprint(key_or_cert_pem: str) -> str:
    """SHA256 hex of the DER SubjectPublicKeyInfo of a private key or certificate PEM."""
    data = key_or_cert_pem.encode()
    if b"CERTIFICATE" in data:
        public = x509.load_pem_x509_certificate(data).public_key()
    else:
        public = serialization.load_pem_private_key(data, password=None).public_key()
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def identity_from_bundle(bundle: dict) -> dict:
    """Image id, fingerprint and serial, cross-checked against the key and certificate.

    A bundle whose recorded fingerprint or serial does not match its own key
    would put a false identity into the manifest, so it is refused.
    """
    missing = [k for k in ("image_id", "key_pem", "cert_pem", "fingerprint", "cert_serial")
               if not bundle.get(k)]
    if bundle.get("format") != "tether-image-credential" or missing:
        raise BuildError(f"not a tether image credential bundle (missing {missing}): "
                         "issue one with `tether-home image issue`")
    fingerprint = key_fingerprint(bundle["key_pem"])
    if fingerprint != key_fingerprint(bundle["cert_pem"]):
        raise BuildError("credential bundle: certificate is not for the bundle's key; re-issue it")
    if fingerprint != bundle["fingerprint"].lower():
        raise BuildError("credential bundle: recorded fingerprint does not match its key; "
                         "re-issue it")
    serial = x509.load_pem_x509_certificate(bundle["cert_pem"].encode()).serial_number
    if int(bundle["cert_serial"], 16) != serial:
        raise BuildError("credential bundle: recorded cert_serial does not match the "
                         "certificate; re-issue it")
    return {"image_id": bundle["image_id"], "connector": bundle.get("connector", ""),
            "key_fingerprint": fingerprint, "cert_serial": f"{serial:x}"}


# ------------------------------------------------------------ the mounted root


def installed_packages(root: Path) -> list[dict]:
    """Packages dpkg lists as installed in `root`, sorted by name.

    Read from var/lib/dpkg/status directly: the root is a mounted image, not
    the running system, and this needs no dpkg on the host.
    """
    status = Path(root) / "var/lib/dpkg/status"
    if not status.is_file():
        raise BuildError(f"{status} not found: is {root} the mounted root of a Debian image?")
    packages = []
    for fields in _paragraphs(status.read_text(encoding="utf-8", errors="replace")):
        if fields.get("Status", "").split()[-1:] == ["installed"]:
            packages.append({"name": fields["Package"], "version": fields.get("Version", ""),
                             "architecture": fields.get("Architecture", "")})
    return sorted(packages, key=lambda p: (p["name"], p["architecture"]))


def _paragraphs(text: str):
    """Yield each deb822 paragraph as {field: first-line value}."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields = {}
        elif not line[0].isspace() and ":" in line:
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
    if fields:
        yield fields


def debian_release(root: Path) -> dict:
    """Debian version (etc/debian_version) and codename (etc/os-release)."""
    root = Path(root)
    release = {"version": _read(root / "etc/debian_version").strip()}
    for line in _read(root / "etc/os-release").splitlines():
        key, _, value = line.partition("=")
        if key in ("VERSION_CODENAME", "PRETTY_NAME"):
            release[key.lower()] = value.strip().strip('"')
    return release


def kernel_versions(root: Path) -> list[str]:
    """Kernel versions with modules in the image (lib/modules/*), oldest first."""
    modules = Path(root) / "lib/modules"
    found = [d.name for d in modules.iterdir() if d.is_dir()] if modules.is_dir() else []
    return sorted(found, key=_version_key)


def agent_version(root: Path) -> str:
    """Version of the tether-agent distribution installed in the appliance's venv."""
    metas = sorted((Path(root) / "opt/tether/venv/lib").glob(
        "python3*/site-packages/tether_agent-*.dist-info/METADATA"))
    for meta in metas:
        match = re.search(r"^Version: (\S+)$", meta.read_text(), re.M)
        if match:
            return match.group(1)
    return ""


def _version_key(version: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.\-+~]", version)]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


# ------------------------------------------------------------ writing


def build_manifest(name: str, bundle: dict, root: Path, ova: Path, raw: Path,
                   built_at: datetime | None = None, progress: TextIO | None = None,
                   known_sha256: dict[str, str] | None = None) -> dict:
    """Collect the manifest for image `name`; hashes the OVA and the raw disk.

    `known_sha256` ({file name: hex}) passes digests computed earlier in the
    build (e.g. OvaResult.sha256) so large files are not read twice.
    """
    root, ova, raw = Path(root), Path(ova), Path(raw)
    known = known_sha256 or {}

    def digest(path: Path) -> str:
        return known.get(path.name) or sha256_file(path, progress)

    for artifact in (ova, raw):
        if not artifact.is_file():
            raise BuildError(f"{artifact} not found: the build did not finish; rerun make image")
    kernels = kernel_versions(root)
    packages = installed_packages(root)
    return {
        "format": FORMAT,
        "version": 1,
        "name": name,
        "built_at": (built_at or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        **identity_from_bundle(bundle),
        "home_urls": list(bundle.get("home_urls", [])),
        "debian": debian_release(root),
        "kernel": kernels[-1] if kernels else "",
        "kernels": kernels,
        "agent_version": agent_version(root),
        "packages": packages,
        "artifacts": {
            ova.name: {"size": ova.stat().st_size, "sha256": digest(ova)},
            raw.name: {"size": raw.stat().st_size, "allocated": allocated_bytes(raw),
                       "sha256": digest(raw)},
        },
    }


def write_manifest(image_dir: Path, manifest: dict) -> Path:
    """Write image_dir/manifest.json atomically (temp name, then rename)."""
    path = Path(image_dir) / MANIFEST
    write_atomic(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n", mode=0o644)
    return path


def write_sha256sums(image_dir: Path, manifest: dict) -> Path:
    """Write SHA256SUMS for the artifacts and manifest.json (`sha256sum -c` format).

    Reuses the digests already in the manifest: hashing a 16 GiB disk twice
    would add a minute to every build.
    """
    image_dir = Path(image_dir)
    digests = {name: meta["sha256"] for name, meta in manifest["artifacts"].items()}
    manifest_path = image_dir / MANIFEST
    if manifest_path.is_file():
        digests[MANIFEST] = sha256_file(manifest_path)
    body = "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
    path = image_dir / SUMS
    write_atomic(path, body, mode=0o644)
    return path


def read_manifest(image_dir: Path) -> dict:
    """Load images/<name>/manifest.json with a clear error when it is missing."""
    path = Path(image_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BuildError(f"{path} not found: build the image first (make image)") from None
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path} is not valid JSON ({exc}): rebuild the image") from None
