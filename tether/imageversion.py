"""Image versions: dot-separated integers (``<agent version>.<build time>``), ordered as tuples.

Shared by the image build (which names a bundle's version), home (which never
offers an instance a version that is not newer) and the agent (which refuses
one). RAUC itself does not compare versions.
"""

from __future__ import annotations


class VersionError(ValueError):
    """Not an image version."""


def parse(version: str) -> tuple[int, ...]:
    parts = str(version).split(".")
    if not version or len(version) > 64 or not all(p.isdigit() and len(p) <= 20 for p in parts):
        raise VersionError(f"version {version!r} is not dot-separated numbers (e.g. 0.1.0.20261205092432)")
    return tuple(int(p) for p in parts)


def make(agent_version: str, when) -> str:
    """`<agent version's numbers>.<when as YYYYMMDDHHMMSS>` (UTC): two builds of one checkout order by time."""
    base = ".".join(p for p in str(agent_version).split("+")[0].split(".") if p.isdigit()) or "0"
    version = f"{base}.{when.strftime('%Y%m%d%H%M%S')}"
    parse(version)
    return version


def newer(candidate: str, running: str) -> bool:
    """True when `candidate` is strictly newer than `running`; an unparsable running version is oldest."""
    try:
        have = parse(running)
    except VersionError:
        have = ()
    return parse(candidate) > have
