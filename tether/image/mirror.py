"""Find the Debian mirror the build machine's apt already uses.

debootstrap must fetch from the mirror this machine is configured for (it
may be the only reachable one), so the URL is read from the host's apt
configuration at run time and never written into the project.
"""

from __future__ import annotations

from pathlib import Path


class MirrorNotFound(RuntimeError):
    """No enabled `deb` source for the wanted suite and component."""


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas, current, key = [], {}, None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
            continue
        if raw[0] in " \t" and key:
            current[key] += " " + raw.strip()
            continue
        if ":" in raw:
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _from_deb822(text: str, suite: str, component: str) -> list[str]:
    found = []
    for st in _deb822_stanzas(text):
        if st.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in st.get("types", "").split():
            continue
        if suite in st.get("suites", "").split() and component in st.get("components", "").split():
            found += st.get("uris", "").split()
    return found


def _from_one_line(text: str, suite: str, component: str) -> list[str]:
    found = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options, e.g. [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 3 and words[1] == suite and component in words[2:]:
            found.append(words[0])
    return found


def find_mirror(suite: str = "bookworm", component: str = "main", apt_dir: Path = Path("/etc/apt")) -> str:
    """Return the first enabled mirror URI serving `suite`/`component`."""
    candidates: list[str] = []
    one_line = [apt_dir / "sources.list"] + sorted((apt_dir / "sources.list.d").glob("*.list"))
    for path in one_line:
        if path.is_file():
            candidates += _from_one_line(path.read_text(errors="replace"), suite, component)
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        candidates += _from_deb822(path.read_text(errors="replace"), suite, component)
    usable = [uri for uri in candidates if uri.startswith(("http://", "https://", "file:/"))]
    if not usable:
        raise MirrorNotFound(
            f"no apt source for '{suite} {component}' in {apt_dir}/sources.list*: "
            "configure a Debian 12 mirror for apt on this machine (apt-get update must work), then retry"
        )
    return usable[0]
