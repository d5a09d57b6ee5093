"""The build-variables file Packer hands to Ansible (`--extra-vars @file`).

Its keys are the contract with the roles (docs/CONTRACTS.md, "Build
variables"); it is made in one place so the names cannot drift.
"""

from __future__ import annotations

import json
from pathlib import Path

from tether.atomicfile import write_atomic

from .errors import BuildError

KEYS = ("tether_wheelhouse", "tether_credential", "tether_image_name", "tether_image_id", "tether_image_version")


def make(wheelhouse: Path, credential: Path, name: str, image_id: str, image_version: str = "0") -> dict:
    """The variables; paths absolute, because Ansible runs from another cwd."""
    if not wheelhouse.is_dir():
        raise BuildError(f"wheelhouse {wheelhouse} is not a directory")
    if not credential.is_file():
        raise BuildError(f"credential {credential} is not a file")
    return {
        "tether_wheelhouse": str(wheelhouse.resolve()),
        "tether_credential": str(credential.resolve()),
        "tether_image_name": name,
        "tether_image_id": image_id,
        # the role update writes it into the slot: the appliance reports it (issue 14)
        "tether_image_version": image_version,
    }


def write(path: Path, variables: dict) -> Path:
    missing = [k for k in KEYS if k not in variables]
    if missing:
        raise BuildError(f"build variables lack {missing}")
    write_atomic(path, json.dumps(variables, indent=2, sort_keys=True) + "\n", mode=0o644,
                 durable=False)
    return path
